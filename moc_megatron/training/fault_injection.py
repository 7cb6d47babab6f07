"""Test hooks that make a run fail at a chosen point, driven by environment variables (off by default).

They exist so that tests can kill a real process at the moment that matters, instead of simulating it:

- ``MOC_FAULT_STALL_SAVE=N``: the save of iteration ``N`` stops after every rank has written its files
  into the hidden staging folder and before the checkpoint is published (renamed, tracker updated); the
  process prints ``fault injection: save of iteration N stalled`` and sleeps, for the test to SIGKILL it.
- ``MOC_FAULT_KILL=RANK:N``: global rank ``RANK`` kills itself with SIGKILL right after iteration ``N``,
  in the first torchrun round only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a restarted run goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch.distributed as dist


def maybe_stall_save(iteration: int) -> None:
    """Sleep forever (until killed) if ``MOC_FAULT_STALL_SAVE`` names this iteration."""
    if os.environ.get("MOC_FAULT_STALL_SAVE") == str(iteration):
        print(f"fault injection: save of iteration {iteration} stalled", flush=True)
        sys.stdout.flush()
        while True:
            time.sleep(60)


def maybe_kill_rank(iteration: int) -> None:
    """SIGKILL this process if ``MOC_FAULT_KILL`` is ``{rank}:{iteration}`` and this is the first round."""
    spec = os.environ.get("MOC_FAULT_KILL")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank, at = (int(x) for x in spec.split(":"))
    if at == iteration and dist.get_rank() == rank:
        print(f"fault injection: rank {rank} killed after iteration {iteration}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
