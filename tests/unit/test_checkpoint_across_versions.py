"""A checkpoint saved on one megatron-core release resumes on the other, on the uninterrupted loss curve.

Needs a second stack: ``MOC_OTHER_STACK_PYTHON`` names its Python (CI sets it: the development stack's
``.venv`` with megatron-core 0.16.1 and the users' ``.venv-users`` with the newest release point at each
other). Both directions run: saved here -> resumed there, and saved there -> resumed here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import megatron.core
import pytest
from test_training_e2e import tiny_args  # tests/unit is on sys.path under pytest

from moc_megatron.platform.megatron_versions import read_common_state
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.loop import pretrain

OTHER_PYTHON = os.environ.get("MOC_OTHER_STACK_PYTHON")
REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_ITERS = 6

if not OTHER_PYTHON and os.environ.get("CI"):
    raise RuntimeError("CI must set MOC_OTHER_STACK_PYTHON (see .ci/run) for the cross-version checkpoint tests")
pytestmark = pytest.mark.skipif(not OTHER_PYTHON, reason="MOC_OTHER_STACK_PYTHON (another stack's python) not set")

# Runs pretrain_moc.py's training in the other stack and prints its megatron-core version and losses.
_RUNNER = """
import json, sys
import megatron.core
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.loop import pretrain
result = pretrain(parse_run_config(sys.argv[1:], world_size=1, exit_on_error=False))
print("RESULT " + json.dumps({"version": megatron.core.__version__, "losses": result.lm_losses}))
"""


def _args(*extra: str) -> list[str]:
    # test_training_e2e's tiny MoC run, shortened (later flags win)
    return tiny_args("--train-iters", str(TRAIN_ITERS), "--lr-decay-iters", str(TRAIN_ITERS), "--log-interval", "1",
                     "--eval-iters", "0", *extra)


def _run_here(*extra: str) -> dict[int, float]:
    return pretrain(parse_run_config(_args(*extra), world_size=1, exit_on_error=False)).lm_losses


def _run_there(*extra: str) -> tuple[str, dict[int, float]]:
    proc = subprocess.run([OTHER_PYTHON, "-c", _RUNNER, *_args(*extra)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line[len("RESULT "):])
    return found["version"], {int(k): v for k, v in found["losses"].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    return _run_here("--save", str(tmp_path_factory.mktemp("full")), "--save-interval", "3")


def _assert_on_curve(resumed: dict[int, float], full: dict[int, float]) -> None:
    assert sorted(resumed) == list(range(4, TRAIN_ITERS + 1)), sorted(resumed)
    for i in resumed:
        assert resumed[i] == pytest.approx(full[i], rel=1e-5, abs=1e-6), (i, resumed[i], full[i])


def test_saved_there_resumes_here(tmp_path, uninterrupted):
    save = str(tmp_path / "ckpt")
    version, first = _run_there("--save", save, "--train-iters", "3")
    assert version != megatron.core.__version__, "the other stack has the same megatron-core"
    assert read_common_state(os.path.join(save, "iter_0000003"))["iteration"] == 3
    for i in (1, 2, 3):
        assert first[i] == pytest.approx(uninterrupted[i], rel=1e-5, abs=1e-6), i
    _assert_on_curve(_run_here("--load", save, "--save", save), uninterrupted)


def test_saved_here_resumes_there(tmp_path, uninterrupted):
    save = str(tmp_path / "ckpt")
    _run_here("--save", save, "--train-iters", "3")
    version, resumed = _run_there("--load", save, "--save", save)
    assert version != megatron.core.__version__
    _assert_on_curve(resumed, uninterrupted)
    assert read_common_state(os.path.join(save, "iter_0000006"))["iteration"] == TRAIN_ITERS

