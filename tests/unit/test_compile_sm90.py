"""Every Triton kernel variant the chapter attention launches compiles for an H100 (sm_90) on this CPU machine.

Runs ``scripts/compile_kernels_sm90.py`` (the project's forward and backward with the launches intercepted,
each distinct launch compiled by Triton for ``GPUTarget("cuda", 90, 32)``; no GPU) at the paper's shapes
(every dtype: 60 variants; fp32 on its own, as the users' stack leaves it to the development stack: see
scripts/test_users_stack.sh) and at one other shape: moc-tiny's head dim 32 and chapters of 16 tokens, GQA
2:1, a ragged chunk and top-k 4, in bf16 only (fp16 compiles to the same tiles and registers as bf16, and fp32
is checked at the paper's shapes). Asserts: every variant compiles; every bf16/fp16 variant uses tensor-core
instructions (``wgmma`` or ``mma``) and spills no register; shared memory within sm_90's per-block limit.
Triton's cache lives in the test's temporary directory. Takes minutes on a 2-core machine, most of it the
fp32 compiles at the paper's shapes. (Chapters of 128 tokens still spill in the chapter-major backward:
docs/kernels.md.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "compile_kernels_sm90.py"
SM90_SHARED_LIMIT = 232448
KEYS = {"kernel", "dtype", "compiled", "error", "shared_bytes", "registers", "spill_bytes", "tensor_core_instructions"}
KERNELS = {"_fwd_unit_major", "_fwd_chapter_major", "_bwd_chapter_major", "_bwd_dq_unit_major"}

# (shape, dtypes): the paper's shapes in every dtype, the fp32 compiles (minutes: no tensor cores, large
# spills) apart; moc-tiny's width (head dim 32, chapters of 16 tokens), GQA 2:1, a ragged chunk, top-k 4.
CASES = {
    "paper-bf16-fp16": ["--dtype", "bf16", "fp16"],
    "paper-fp32": ["--dtype", "fp32"],
    "tiny-gqa-bf16": ["--hidden", "128", "--heads", "4", "--kv-heads", "2", "--chapter-size", "16", "--top-k", "4",
                      "--seq-length", "256", "--chunk-size", "24", "--dtype", "bf16"],
}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the dev extra)")


@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_variant_compiles_for_sm90(case, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)  # the script's Triton cache (a temporary directory) goes here
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *CASES[case], "--jobs", "2", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = json.loads(out.read_text())

    assert variants and all(KEYS <= set(v) for v in variants)
    assert {v["kernel"] for v in variants} == KERNELS
    dtypes = CASES[case][CASES[case].index("--dtype") + 1:]
    assert {v["dtype"] for v in variants} == set(dtypes)
    for v in variants:
        name = f"{v['kernel']} {v['dtype']} {v['gating']} {v['constexprs']} {v['specialised']}"
        assert v["compiled"] and v["error"] is None, name
        assert 0 < v["shared_bytes"] <= SM90_SHARED_LIMIT, (name, v["shared_bytes"])
        if v["dtype"] in ("bf16", "fp16"):
            assert v["tensor_core_instructions"] > 0, name
            assert v["spill_bytes"] == 0 and v["spill_load_bytes"] == 0, (name, v["spill_bytes"])
    # Both schedules of both gatings, with and without the fused dQ, for every routing unit and read site.
    bwd = {(v["gating"], v["constexprs"]["WRITE_DQ"]) for v in variants if v["kernel"] == "_bwd_chapter_major"}
    assert bwd == {(g, w) for g in ("paper", "mixture") for w in (False, True)}
    schedules = {}
    for label in (label for v in variants for label in v["launched_by"]):
        unit, site, schedule = label.rstrip("!").split("/")
        schedules.setdefault((unit, site), set()).add(schedule)
    assert schedules == {(u, s): {"unit", "chapter"} for u in ("sequence", "chunk", "token")
                         for s in ("local", "ep-routed", "ep-shared")}
