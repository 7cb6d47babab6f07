"""Mixture-of-Chapters language models on megatron-core."""

import warnings

# megatron-core warns at import time, once per module, that it falls back to PyTorch implementations when
# Transformer Engine / Apex are absent (always the case on a CPU). The fallback is what we use there.
for _message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
