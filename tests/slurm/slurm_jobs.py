"""Helpers of the slurm tier: the tiny job's settings, the cluster's client commands, job logs and losses."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH_FILE = REPO_ROOT / "examples" / "pretrain_slurm.sbatch"
TORCHRUN_SCRIPT = REPO_ROOT / "examples" / "pretrain_torchrun_multinode.sh"

ITERS, SAVE_INTERVAL = 12, 4
# Small enough for four gloo ranks on two cores; every layer kind of the model is there (a memory layer, EP).
TINY_MODEL = (
    "--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 2 --num-query-groups 2 "
    "--seq-length 32 --moc-memory-layers 1 --moc-num-chapters 5 --moc-chapter-size 4 --moc-top-k 2 "
    "--moc-num-heads 2 --moc-num-query-groups 2 --num-workers 0"
)
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+) \|")
LOADED_LINE = re.compile(r"loaded checkpoint (\S+) at iteration (\d+)")
# The layout tests' tolerance (tests/distributed/test_training_parallel.py): other layouts sum in another order.
LOSS_REL_TOL = 2e-6
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def tiny_job_env(data: str, tokenizer: str) -> dict[str, str]:
    """The launchers' variables for the tests' job: CPU, 2 ranks per node, EP=2, a tiny model, ITERS steps."""
    return {
        "DEVICE": "cpu", "GPUS_PER_NODE": "2", "SBATCH_GPUS_PER_NODE": "0",
        "PRESET": "moc-tiny", "EXTRA_ARGS": TINY_MODEL, "EP": "2",
        "DATA_PATH": data, "TOKENIZER": tokenizer, "TOKENIZER_TYPE": "SentencePieceTokenizer", "SPLIT": "90,10,0",
        "MICRO_BATCH": "1", "GLOBAL_BATCH": "4", "TRAIN_ITERS": str(ITERS),
        "LR": "5e-3", "MIN_LR": "5e-4", "MEMORY_LR": "5e-3", "BANK_LR": "1e-2",
        "WARMUP_ITERS": "1", "WSD_DECAY_ITERS": "4",
        "SAVE_INTERVAL": str(SAVE_INTERVAL), "EVAL_INTERVAL": "1000", "EVAL_ITERS": "0", "LOG_INTERVAL": "1",
        "PYTHONWARNINGS": "ignore",
    }


def free_port() -> int:
    """A TCP port nobody listens on now (each job's rendezvous gets its own)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def losses_of(log: str) -> dict[int, float]:
    """Iteration -> logged loss; a later line for the same iteration (a restarted run) wins."""
    return {int(i): float(v) for i, v in LOSS_LINE.findall(log)}


def assert_on_curve(got: dict[int, float], want: dict[int, float], iterations) -> None:
    """Every iteration's loss equals the reference's within :data:`LOSS_REL_TOL`."""
    for i in iterations:
        assert i in got, f"iteration {i} not logged: {sorted(got)}"
        assert got[i] == pytest.approx(want[i], rel=LOSS_REL_TOL), f"iteration {i}: {got[i]} vs {want[i]}"


def curves_table(named: dict[str, dict[int, float]]) -> str:
    """The loss curves side by side, one row per iteration."""
    names = list(named)
    rows = [f"{'iter':>4}  " + "  ".join(f"{n:>14}" for n in names)]
    for i in sorted(set().union(*named.values())):
        rows.append(f"{i:>4}  " + "  ".join(f"{named[n].get(i, float('nan')):>14.7E}" for n in names))
    return "\n".join(rows)


def run_group(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> int:
    """Run ``cmd`` in its own process group with output to ``log``; kill the group after ``timeout`` seconds."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout:.0f}s; log {log}:\n{log.read_text()[-4000:]}",
                        pytrace=False)


@dataclass
class SlurmCluster:
    """The client side of the running local cluster (``SLURM_CONF`` of ``folder``)."""

    folder: Path
    jobs: list[int] = field(default_factory=list)

    @property
    def conf(self) -> str:
        return str(self.folder / "slurm.conf")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment (the venv's python on PATH), the cluster's SLURM_CONF and ``extra``."""
        return {**os.environ, "SLURM_CONF": self.conf, **(extra or {})}

    def run(self, *cmd: str, timeout: float = 30) -> str:
        """A SLURM client command's stdout; fails the test with its stderr on a non-zero exit."""
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(), timeout=timeout)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}", pytrace=False)
        return done.stdout

    def submit(self, env: dict[str, str], log: Path, *sbatch_args: str) -> int:
        """``sbatch --nodes=2 ... examples/pretrain_slurm.sbatch`` with ``env``; the job's id."""
        cmd = ["sbatch", "--parsable", "--nodes=2", f"--output={log}", *sbatch_args, str(SBATCH_FILE)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                              env=self.env({"MASTER_PORT": str(free_port()), **env}), timeout=30)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        job_id = int(done.stdout.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id))
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_done(self, job_id: int, timeout: float, log: Path) -> dict[str, str]:
        """Wait until the job ended (after any requeue); its last ``scontrol show job`` record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL_STATES:
                return info
            time.sleep(0.5)
        self.run("scancel", str(job_id))
        tail = log.read_text()[-4000:] if log.exists() else "(no log)"
        pytest.fail(f"job {job_id} did not end within {timeout:.0f}s ({self.job(job_id)['JobState']}); log:\n{tail}",
                    pytrace=False)

    def reset(self) -> None:
        """Cancel every job still queued or running and bring both nodes back to idle."""
        self.run("scancel", "--user=root")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queued = self.run("squeue", "-h", "-o", "%i").split()
            states = self.run("sinfo", "-h", "-N", "-o", "%N=%t").split()
            down = [s.split("=")[0] for s in states if s.split("=")[1].rstrip("*") in ("down", "drain", "drng")]
            for node in down:
                self.run("scontrol", "update", f"nodename={node}", "state=resume")
            if not queued and sorted(states) == ["node1=idle", "node2=idle"]:
                return
            time.sleep(0.5)
        pytest.fail(f"cluster not back to idle: {self.run('sinfo', '-N')}", pytrace=False)

    def rank_pid(self, job_id: int, rank: int) -> int | None:
        """The PID of the job's training process with global RANK ``rank`` (not torchrun's agent, not a helper)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if (len(cmdline) > 2 and cmdline[1] == b"-u" and cmdline[2].endswith(b"pretrain_moc.py")
                    and environ.get(b"SLURM_JOB_ID") == str(job_id).encode()
                    and environ.get(b"RANK") == str(rank).encode()):
                return int(entry.name)
        return None

    def leftover_processes(self) -> list[str]:
        """Processes that still carry this cluster's SLURM_CONF (daemons, job steps, ranks)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or entry.name == str(os.getpid()):
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    left.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:120]!r}")
            except OSError:
                continue
        return left

    def job_report(self) -> str:
        """``squeue`` of every job of the session and the job-completion records (one per run, requeues too).

        The cluster keeps no accounting database (no slurmdbd), so ``sacct`` has nothing to show; the
        ``jobcomp/filetxt`` records hold what it would: one line per run of a job, with its end state.
        """
        squeue = subprocess.run(["squeue", "--states=all", "-o",
                                 "%.6i %.12j %.10T %.8M %.6D %R"], capture_output=True, text=True, env=self.env())
        comp = self.folder / "log" / "jobcomp.log"
        fields = ("JobId", "Name", "JobState", "StartTime", "EndTime", "NodeList", "ExitCode")
        records = []
        for line in (comp.read_text().splitlines() if comp.exists() else []):
            kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
            records.append(" ".join(f"{k}={kv.get(k, '')}" for k in fields))
        return "squeue --states=all:\n" + squeue.stdout + "job completions (jobcomp/filetxt):\n" + "\n".join(records)
