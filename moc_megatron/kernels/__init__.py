"""Chapter-attention implementations beyond the gather reference: the blocked PyTorch path and the Triton kernel."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it is not needed for the ``gather`` and ``blocked`` paths)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return True
