"""Mixture-of-Chapters language models on megatron-core."""
