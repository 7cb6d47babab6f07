"""Data: tokenizers, jsonl corpora to Megatron indexed datasets, chat SFT data, and corpora that need no download.

- :mod:`~moc_megatron.data.tokenizer`: ``build_tokenizer`` / ``MoCTokenizer`` (sentencepiece or local HF folder).
- :mod:`~moc_megatron.data.chat`: chat templates and assistant masks.
- :mod:`~moc_megatron.data.preprocess`, :mod:`~moc_megatron.data.sft_preprocess`: the engines of
  ``tools/preprocess_data.py`` and ``tools/preprocess_sft.py``.
- :mod:`~moc_megatron.data.sft_dataset`: ``SFTDataset`` for fine-tuning.
- :mod:`~moc_megatron.data.synthetic_corpus`, :mod:`~moc_megatron.data.text_corpus`: built-in corpora.

Nothing is imported here, so importing a submodule stays cheap.
"""
