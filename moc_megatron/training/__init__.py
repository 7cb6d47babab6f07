"""Training on megatron-core: ``pretrain_moc.py`` and ``finetune_moc.py``.

- :mod:`~moc_megatron.training.arguments`, :mod:`~moc_megatron.training.validate_args`: the command line,
  its checks and derived values (the ``--moc-*`` flags come from :mod:`moc_megatron.config_flags`).
- :mod:`~moc_megatron.training.run_config`, :mod:`~moc_megatron.training.config_from_args`: the frozen
  :class:`RunConfig` built once from the validated flags, and megatron-core's configurations from it.
- :mod:`~moc_megatron.training.setup`, :mod:`~moc_megatron.training.loop`,
  :mod:`~moc_megatron.training.train_step`: process groups, the model/optimizer stack, the loop.
- :mod:`~moc_megatron.training.checkpointing`: save/resume (layout, metadata and the model signature are
  in :mod:`moc_megatron.checkpoint`).
- :mod:`~moc_megatron.training.finetune`: instruction tuning (SFT).

Nothing is imported here, so importing a submodule stays cheap.
"""
