"""The MoC GPT model on megatron-core.

- :mod:`~moc_megatron.model.moc_model`: ``MoCGPTModel`` (megatron's ``GPTModel`` plus the memory bank).
- :mod:`~moc_megatron.model.layer_specs`: ``ModuleSpec`` of dense and memory layers (Transformer Engine or local).
- :mod:`~moc_megatron.model.builder`: ``ModelSettings`` and the model chunks of this pipeline rank.
- :mod:`~moc_megatron.model.core_attention`, :mod:`~moc_megatron.model.norm`: the local spec's SDPA core
  attention and norms (they run on a CPU and under sequence parallelism).
- :mod:`~moc_megatron.model.flops`: parameter and FLOP accounting.

Nothing is imported here, so importing a submodule stays cheap.
"""
