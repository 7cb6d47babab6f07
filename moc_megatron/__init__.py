"""Mixture-of-Chapters language models on megatron-core."""

import logging
import warnings

# megatron-core warns at import time, once per module, that it falls back to PyTorch implementations when
# Transformer Engine / Apex are absent (always the case on a CPU). The fallback is what we use there.
for _message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
# megatron-core 0.19 imports its experimental multimodal package on the way to the GPT model; we do not use it.
warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental", category=UserWarning)


def _drop_no_cuda_runtime_notice(record: logging.LogRecord) -> bool:
    """torch's CUDA build on a machine with a CUDA toolkit and no GPU logs "No CUDA runtime is found" when
    megatron-core (0.19: tensor_parallel/random.py) imports ``torch.utils.cpp_extension``; a CPU run is
    intended here, so that one notice is dropped before anything imports torch."""
    return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_drop_no_cuda_runtime_notice)
