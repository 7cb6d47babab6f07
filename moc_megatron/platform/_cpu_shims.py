"""The two mechanisms the CPU adaptations are built from.

1. ``cpu_torch``: a view of the ``torch`` module in which the CUDA device is the CPU. An adaptation
   binds it as the global name ``torch`` of one megatron-core module, so only the code of that module
   sees it. Its ``torch.cuda`` answers ``current_device()`` with the CPU device, makes
   ``synchronize``/streams/events no-ops and seeds the CPU generator in ``manual_seed``; its tensor
   factories (``torch.zeros(..., device="cuda")`` and friends) allocate on the CPU. Everything else is
   the real ``torch`` (a snapshot of its namespace, so attribute lookups cost nothing extra).
2. ``cuda_tensor_methods_on_cpu``: a ``TorchFunctionMode`` for the few megatron-core functions that call
   CUDA-specific *tensor methods*: ``Tensor.type()`` reports ``torch.cuda.*Tensor`` for CPU tensors and
   ``Tensor.cuda()`` leaves the tensor on the CPU. It is entered only around those functions
   (``wrap_in_cuda_tensor_methods``), never process-wide.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so every wait is already over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: one (synchronous) stream per process."""

    _instance: _NullStream | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _NullStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by an adapted megatron-core module: the CUDA device is the CPU.

    Names not defined here fall through to the real ``torch.cuda`` (looked up on every access, so
    e.g. a test's monkeypatch of ``torch.cuda.is_available`` stays visible).
    """

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda seen from a CPU-adapted megatron-core module")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def is_available() -> bool:
        # False also under MOC_FORCE_CPU=1 on a GPU machine: adapted code must not take CUDA paths.
        return False

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def manual_seed(seed: int) -> None:
        # The device generator is the CPU default generator (see cpu_rng.py).
        torch.default_generator.manual_seed(int(seed))


def is_cuda_device(device: Any) -> bool:
    """True if ``device`` (str, int index, torch.device or None) names a CUDA device."""
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _allocating_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def factory_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        if is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return factory_on_cpu


# Factories megatron-core calls with device="cuda" literals (the device argument is keyword-only).
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange",
    "empty_like", "zeros_like", "ones_like", "full_like",
)


def _make_cpu_torch() -> types.ModuleType:
    view = types.ModuleType("torch", "torch seen from a CPU-adapted megatron-core module")
    view.__dict__.update(vars(torch))
    view.cuda = _CpuCuda()
    for name in _FACTORIES:
        setattr(view, name, _allocating_on_cpu(getattr(torch, name)))
    # Module-level __getattr__ (PEP 562): submodules torch loads lazily after the snapshot.
    view.__getattr__ = lambda name: getattr(torch, name)
    return view


cpu_torch: types.ModuleType = _make_cpu_torch()


def bind_cpu_torch(module: types.ModuleType) -> None:
    """Make ``module``'s code see ``cpu_torch`` as ``torch``. Idempotent."""
    current = getattr(module, "torch", None)
    if current is cpu_torch:
        return
    if current is not torch:
        raise RuntimeError(
            f"moc_megatron.platform: {module.__name__} has no module-level `torch` to adapt "
            f"(found {current!r}); megatron-core's layout changed, update platform/cpu_adapter.py"
        )
    module.torch = cpu_torch


class _CudaTensorMethodsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, arg_types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        out = func(*args, **kwargs)
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            out = "torch.cuda." + out[len("torch."):]
        return out


@contextlib.contextmanager
def cuda_tensor_methods_on_cpu() -> Iterator[None]:
    """Within this block ``Tensor.type()`` of a CPU tensor reads ``torch.cuda.<T>Tensor`` and
    ``Tensor.cuda()`` returns the tensor unchanged."""
    with _CudaTensorMethodsOnCpu():
        yield


def wrap_in_cuda_tensor_methods(owner: Any, name: str, *also_bound_in: types.ModuleType) -> None:
    """Replace ``owner.name`` (a function or method) by a wrapper that runs it inside
    ``cuda_tensor_methods_on_cpu()``; ``also_bound_in`` are modules that imported the same function
    by name and get the wrapper too. Idempotent."""
    # For a class, only a function defined on the class itself (not inherited, not a static/class method).
    original = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if not isinstance(original, types.FunctionType):
        raise RuntimeError(
            f"moc_megatron.platform: {owner.__name__}.{name} is not a function defined there; "
            "megatron-core's layout changed, update platform/cpu_adapter.py"
        )
    if getattr(original, "_moc_cpu_wrapped", False):
        return
    for module in also_bound_in:
        if getattr(module, name, None) is not original:
            raise RuntimeError(
                f"moc_megatron.platform: {module.__name__}.{name} is not {owner.__name__}.{name}; "
                "megatron-core's layout changed, update platform/cpu_adapter.py"
            )

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_tensor_methods_on_cpu():
            return original(*args, **kwargs)

    wrapper._moc_cpu_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
    for module in also_bound_in:
        setattr(module, name, wrapper)
