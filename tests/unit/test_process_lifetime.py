"""No process outlives its run: megatron-core's checkpoint writer children die with their rank.

- :func:`writer_children_die_with_rank` on its own: a child (and grandchild) forked inside it dies when
  its parent is SIGKILLed; one forked outside lives on (so the check can tell the difference).
- A real ``pretrain_moc.py`` SIGKILLed at three moments of its saves (writer children mid-write, a save
  written but not yet published, right after a training step) leaves no descendant behind, and the next
  run resumes from the last published checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from moc_megatron.checkpoint.layout import read_tracker
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.loop import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def alive(proc: psutil.Process) -> bool:
    """Running (a zombie waiting for a reaper counts as gone; ``is_running`` also guards against pid reuse)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(procs: list[psutil.Process], wait: float = 15.0) -> list[str]:
    """Those of ``procs`` still alive after up to ``wait`` seconds (killed here, so a failure leaves none)."""
    deadline = time.monotonic() + wait
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            pass
    return names


FORKER = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from moc_megatron.training.save_queue import writer_children_die_with_rank

    def grandchild_then_sleep(path):
        g = mp.get_context("fork").Process(target=time.sleep, args=(600,))
        g.start()
        open(path, "w").write(str(g.pid))
        time.sleep(600)

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        with writer_children_die_with_rank():
            inside = ctx.Process(target=grandchild_then_sleep, args=(sys.argv[1],))
            inside.start()
        outside = ctx.Process(target=time.sleep, args=(600,))
        outside.start()
        while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
            time.sleep(0.05)
        print(inside.pid, open(sys.argv[1]).read(), outside.pid, flush=True)
        time.sleep(600)
""")


def test_children_forked_inside_the_block_die_with_their_parent(tmp_path):
    script = tmp_path / "forker.py"
    script.write_text(FORKER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "grandchild.pid")], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    outside = None
    try:
        inside_pid, grandchild_pid, outside_pid = (int(x) for x in proc.stdout.readline().split())
        inside, grandchild, outside = (psutil.Process(p) for p in (inside_pid, grandchild_pid, outside_pid))
        proc.kill()
        proc.wait(timeout=30)
        assert survivors([inside, grandchild]) == []
        assert alive(outside)  # forked outside the block: nothing asked it to die
    finally:
        if proc.poll() is None:
            proc.kill()
        if outside is not None and alive(outside):
            outside.kill()


def tiny(*extra: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--vocab-size", "128", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--lr-decay-iters", "8", "--train-iters", "8", "--save-interval", "1",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", *extra,
    ]


# pretrain_moc.py whose checkpoint writer children stall (print, then sleep) when they write the save of
# iteration $STALL_WRITER: the rank then waits for them, and the test kills it in the middle of the save.
STALLING_RUN = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, os.getcwd())
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data
    stall = os.environ.get("STALL_WRITER")

    def stalling(*args, **kwargs):
        bucket = kwargs.get("write_bucket", args[2] if len(args) > 2 else None)
        if stall and f".iter_{int(stall):07d}.partial" in str(bucket[0]):
            print(f"writer stalled pid {os.getpid()}", flush=True)
            time.sleep(600)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(stalling)
    import pretrain_moc

    if __name__ == "__main__":
        pretrain_moc.main(sys.argv[1:])
""")


def kill_at(script, save, marker: str, env: dict[str, str],
            self_kill: bool = False) -> tuple[list[psutil.Process], str, int]:
    """Run until ``marker`` is printed, SIGKILL the run (or let it kill itself); return its descendants
    seen while it ran (all of them must be gone afterwards), the output line with the marker and its pid."""
    cmd = [sys.executable, str(script), *tiny("--save", str(save), "--load", str(save))]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MOC_FORCE_CPU": "1", **env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO)
    rank = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    lines, found = [], ""
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            for child in rank.children(recursive=True) if alive(rank) else []:
                seen.setdefault(child.pid, child)
            if marker in line:  # (no reading to the end: a leftover process would hold the pipe open)
                found = line
                break
            assert time.monotonic() < deadline, "".join(lines)
        if not found:
            pytest.fail("the run ended without reaching the moment to kill it:\n" + "".join(lines))
        if not self_kill:
            for child in rank.children(recursive=True):
                seen.setdefault(child.pid, child)
            proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return list(seen.values()), found, proc.pid


def test_a_run_killed_during_its_saves_leaves_no_process_and_resumes(tmp_path):
    script = tmp_path / "stalling_pretrain.py"
    script.write_text(STALLING_RUN)
    save = tmp_path / "ckpt"

    # 1. writer children forked and writing the save of iteration 2: the rank waits for them
    seen, line, rank = kill_at(script, save, "writer stalled", {"STALL_WRITER": "2"})
    writer = int(line.split()[-1])
    # megatron-core 0.16 forks its writers (one was running when the rank died); 0.19 writes in threads
    assert writer in {p.pid for p in seen} or writer == rank
    assert survivors(seen) == [] and read_tracker(str(save)) == 1
    # 2. every file of iteration 3 written (writer children done), not yet published
    seen, _, _ = kill_at(script, save, "save of iteration 3 stalled", {"MOC_FAULT_STALL_SAVE": "3"})
    assert survivors(seen) == [] and read_tracker(str(save)) == 2
    # 3. right after training step 5, between saves
    seen, _, _ = kill_at(script, save, "killed after iteration 5", {"MOC_FAULT_KILL": "0:5"}, self_kill=True)
    assert survivors(seen) == [] and read_tracker(str(save)) == 4

    resumed = pretrain(parse_run_config(tiny("--save", str(save), "--load", str(save)), world_size=1,
                                        exit_on_error=False))
    assert resumed.start_iteration == 4 and resumed.iteration == 8 and read_tracker(str(save)) == 8
