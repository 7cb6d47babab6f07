"""Megatron checkpoints as data, apart from training: ``training/``, ``hf/`` and ``eval/`` read them here.

- :mod:`~moc_megatron.checkpoint.layout`: folders, the tracker file, crash-safe publication, what
  ``--load``/``--save`` may point at, and the checkpoint errors.
- :mod:`~moc_megatron.checkpoint.signature`: the model signature a checkpoint and its loader must agree on.
- :mod:`~moc_megatron.checkpoint.model_config`: the flag -> ``MoCConfig`` field table and the model record
  (the model part of a run, stored as data).
- :mod:`~moc_megatron.checkpoint.metadata`: the common state saved with the tensors.
- :mod:`~moc_megatron.checkpoint.weights`: a weights-only iteration-0 checkpoint (import, tests).

Nothing is imported here, so importing a submodule stays cheap.
"""
