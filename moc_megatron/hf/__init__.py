"""Hugging Face interoperability.

- :mod:`~moc_megatron.hf.export` (``tools/convert_checkpoint.py``): a Megatron checkpoint -> a transformers folder.
- :mod:`~moc_megatron.hf.importer`: a transformers folder (MoC, or a dense Llama/Mistral/Qwen2/Qwen3 model plus
  new memory, :mod:`~moc_megatron.hf.families`) -> a Megatron checkpoint.
- :mod:`~moc_megatron.hf.sp_convert`: a sentencepiece model -> an exact ``tokenizer.json``.
- :mod:`~moc_megatron.hf.modeling_moc`, :mod:`~moc_megatron.hf.configuration_moc`: the remote-code model
  copied into every exported folder; :mod:`~moc_megatron.hf.names`: the parameter-name mapping.

Nothing is imported here, so importing a submodule stays cheap.
"""
