"""Interrupting a test run (SIGINT or SIGTERM to pytest) ends torchrun and every rank it started.

``run_distributed`` starts torchrun in its own session (so a timeout can kill the whole group); a signal
sent to pytest alone must therefore be passed on by pytest itself. Each case starts pytest on a
two-rank test whose ranks sleep, signals pytest once both ranks run, and checks that pytest exits and no
process it started is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent

SLEEPING_TEST = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {here!r})
    from launch import run_distributed

    def _sleep():
        path = os.path.join(os.environ["PID_DIR"], "rank" + os.environ["RANK"])
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        time.sleep(600)

    def test_sleeps():
        run_distributed(_sleep, nprocs=2, env={{"PID_DIR": os.environ["PID_DIR"]}}, timeout=600)
""")


def _default_sigint() -> None:
    """Run in the child before exec: a shell's background job starts with SIGINT ignored, and a Python started
    that way never raises KeyboardInterrupt; the test is about what pytest does when it does get one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_pytest_ends_torchrun_and_its_ranks(tmp_path, sig):
    test_file = tmp_path / "test_sleeping.py"
    test_file.write_text(SLEEPING_TEST.format(here=str(HERE)))
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "PID_DIR": str(pids), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,  # its own group: the signal below reaches pytest only
                            preexec_fn=_default_sigint)
    session = psutil.Process(proc.pid)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while len(list(pids.glob("rank?"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        tree = session.children(recursive=True)
        ranks = {int((pids / f"rank{r}").read_text()) for r in (0, 1)}
        assert ranks <= {p.pid for p in tree}  # torchrun and both ranks are pytest's descendants
        proc.send_signal(sig)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{p.pid} {' '.join(p.cmdline())[:160]}" for p in tree if _alive(p)]
        assert left == [], f"left running after {sig.name} to pytest: {left}"
    finally:
        for p in [session, *tree]:
            if _alive(p):
                p.kill()
