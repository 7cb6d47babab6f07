"""On a GPU: the compiled Triton chapter attention (and the blocked path) against gather, fp32 / fp16 / bf16.

Skipped without CUDA (tests/gpu/conftest.py). The reference is gather in fp32 on the same inputs; fp16/bf16
inputs are compared with tolerances of their rounding (the kernel accumulates in fp32).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from chapter_cases import Case, assert_same, forward_backward, make_inputs  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = {
    "sequence": Case(n=2, u=256, h=4, g=2, e=64, c=40, t=64, k=8),
    "chunk": Case(n=16, u=64, h=4, g=4, e=64, c=40, t=64, k=8),
    "token": Case(n=512, u=1, h=4, g=2, e=64, c=40, t=64, k=8),
    "ragged": Case(n=37, u=3, h=3, g=1, e=48, c=23, t=40, k=5),
    "k64-t128": Case(n=4, u=32, h=2, g=2, e=64, c=80, t=128, k=64),
}
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _compiled():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: these tests check the compiled kernels")
    pytest.importorskip("triton")


def _reference(inputs, gating):
    return forward_backward("gather", tuple(x.double() if x.is_floating_point() else x for x in inputs), gating)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("schedule", ["unit", "chapter"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_matches_gather_on_cuda(name, schedule, gating, dtype):
    from moc_megatron.kernels.triton_chapter_attention import triton_chapter_attention

    inputs = make_inputs(CASES[name], dtype, device="cuda")
    want = _reference(inputs, gating)
    got = forward_backward(functools.partial(triton_chapter_attention, schedule=schedule), inputs, gating)
    tol = TOL[dtype]
    assert_same(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("name", ["chunk", "token"])
def test_triton_backward_is_deterministic(name, gating):
    inputs = make_inputs(CASES[name], torch.bfloat16, device="cuda")
    first = forward_backward("triton", inputs, gating)
    second = forward_backward("triton", inputs, gating)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_blocked_matches_gather_on_cuda(gating):
    inputs = make_inputs(CASES["chunk"], torch.float32, device="cuda")
    assert_same(forward_backward("blocked", inputs, gating), _reference(inputs, gating), atol=2e-5, rtol=2e-5)


def test_auto_picks_triton_on_cuda():
    from moc_megatron.kernels.choice import resolve_impl

    assert resolve_impl("auto", torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == "triton"
    assert resolve_impl("auto", torch.zeros(1, device="cuda", dtype=torch.float64)) == "blocked"
