"""Run a multi-process (torchrun, gloo) test from pytest.

    from launch import run_distributed            # tests/distributed is on sys.path under pytest

    def _worker():                                # module level, no arguments
        platform.initialize_distributed(tensor_model_parallel_size=2)
        ...                                       # assert inside the workers
        platform.destroy_distributed()

    def test_something():
        run_distributed(_worker, nprocs=2)

``run_distributed`` starts ``torchrun --standalone --nproc_per_node=N`` (a free rendezvous port is
picked by the OS, so parallel test runs do not collide) on either a script or a module-level
function, waits at most ``timeout`` seconds and fails the calling test with the workers' output if
any worker exits non-zero or time runs out. An interrupt (SIGINT, or SIGTERM: :func:`interrupt_on_sigterm`)
kills torchrun's whole process group before it propagates, so no launcher or rank outlives the test run.
Workers get ``MOC_FORCE_CPU=1`` (these are gloo tests,
also on a GPU machine) and ``OMP_NUM_THREADS=1`` unless ``env`` says otherwise. Pass parameters to a
function through ``env``. A function's module is loaded in the workers by file path with its own
directory on ``sys.path`` (so ``import _mcore_helpers`` works there as it does under pytest); keep
its top level free of side effects.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_OUTPUT_TAIL_CHARS = 20_000


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in this (main-thread) process, as SIGINT does.

    Python's default SIGTERM ends the process at once, skipping every ``finally``: the torchrun groups
    started here (own sessions, so a terminal's signals miss them) and ``subprocess.run`` children would
    live on. As an exception, the clean-ups run (pytest reports the interrupt and stops).
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def run_distributed(
    target: str | os.PathLike[str] | Callable[[], object],
    nprocs: int,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    args: Sequence[str] = (),
    max_restarts: int = 0,
) -> str:
    """Run ``target`` on ``nprocs`` processes with torchrun and return their combined output.

    Args:
        target: path of a Python script (it needs an ``if __name__ == "__main__":`` guard), or a
            module-level function taking no arguments, defined in a file.
        nprocs: number of worker processes.
        env: extra environment variables for the workers (override the defaults above).
        timeout: seconds before the whole process group is killed and the test fails.
        args: command-line arguments for a script target.
        max_restarts: torchrun's ``--max-restarts`` (restart rounds after a worker fails).

    Fails the calling pytest test (``pytest.fail``) on a non-zero exit or a timeout.
    """
    if callable(target):
        script = Path(__file__).resolve()
        script_args = ["--call", _locate(target)]
    else:
        script = Path(target).resolve()
        script_args = list(args)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={nprocs}", f"--max-restarts={max_restarts}",
        str(script), *script_args,
    ]
    interrupt_on_sigterm()
    child_env = {**os.environ, "MOC_FORCE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # Output goes to a file and the wait is on torchrun itself, not on the end of its output: a
    # process left behind by a killed worker must not keep the test waiting. Leftovers are then killed.
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env,
            start_new_session=True,  # own process group: a timeout kills torchrun and all its workers
        )
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on an interrupt: torchrun and its workers go with it
            _kill_group(proc)
        log.seek(0)
        output = log.read()
    if timed_out:
        _fail(f"timed out after {timeout:.0f}s", cmd, output)
    if proc.returncode != 0:
        _fail(f"exit code {proc.returncode}", cmd, output)
    return output


def _locate(fn: Callable[[], object]) -> str:
    source = inspect.getsourcefile(fn)
    if source is None or fn.__qualname__ != fn.__name__ or fn.__name__ == "<lambda>":
        raise ValueError(f"run_distributed needs a module-level function defined in a file, got {fn!r}")
    return f"{Path(source).resolve()}:{fn.__name__}"


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, torchrun's process group (torchrun, its workers and anything they left)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def _fail(reason: str, cmd: Sequence[str], output: str) -> None:
    import pytest

    tail = output[-_OUTPUT_TAIL_CHARS:]
    message = f"distributed run failed ({reason}): {' '.join(cmd)}\n----- worker output (tail) -----\n{tail}"
    pytest.fail(message, pytrace=False)


def _call(spec: str) -> None:
    """Worker side of ``run_distributed(fn)``: load ``file`` by path and call ``fn()``."""
    path, name = spec.rsplit(":", 1)
    sys.path.insert(0, str(Path(path).parent))
    module_name = Path(path).stem
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    getattr(module, name)()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--call":
        sys.exit("usage: launch.py --call /path/to/file.py:function (run by run_distributed)")
    _call(sys.argv[2])
