"""The SLURM and torchrun launchers on a real two-node SLURM cluster (scripts/slurm_local_cluster.sh).

Every job trains the same tiny MoC model on the same data for ITERS iterations with a checkpoint every
SAVE_INTERVAL, on the CPU (gloo): 2 nodes x 2 ranks, EP=2 (routed chapters split over two ranks, each
half held by two expert-data-parallel ranks; DP=4 for the dense weights). The reference is one process
started by the same torchrun script (1 node, 1 rank, EP=1): every job's losses must lie on its curve
within the layout tests' tolerance, including the iterations redone after a requeue or a restart.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from slurm_jobs import (
    ITERS,
    LOADED_LINE,
    SAVE_INTERVAL,
    TORCHRUN_SCRIPT,
    SlurmCluster,
    assert_on_curve,
    curves_table,
    free_port,
    losses_of,
    run_group,
)

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def reference(job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """One process, started by examples/pretrain_torchrun_multinode.sh on this machine: iteration -> loss."""
    folder = tmp_path_factory.mktemp("reference")
    env = {**os.environ, **job_env, "NNODES": "1", "GPUS_PER_NODE": "1", "EP": "1", "MAX_RESTARTS": "0",
           "PREFLIGHT": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": str(free_port()),
           "SAVE_DIR": str(folder / "ckpt")}
    log = folder / "reference.out"
    assert run_group(["bash", str(TORCHRUN_SCRIPT)], env, JOB_TIMEOUT_S, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "TP=1 PP=1 EP=1 DP=1" in text
    losses = losses_of(text)
    assert sorted(losses) == list(range(1, ITERS + 1)), text[-3000:]
    assert losses[ITERS] < losses[1] - 0.1, losses  # it learns: a curve that tells iterations apart
    return losses


def _wait_for_checkpoint(cluster: SlurmCluster, job_id: int, save_dir: Path, log: Path) -> int:
    """Poll until the job's first checkpoint is published; the tracker's iteration."""
    tracker = save_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if tracker.exists() and tracker.read_text().strip():
            return int(tracker.read_text())
        if cluster.job(job_id)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.05)
    pytest.fail(f"job {job_id} wrote no checkpoint; log:\n{log.read_text()[-4000:]}", pytrace=False)


def _check_resumed_run(text: str, start: int, reference: dict[int, float], saved_before: int) -> int:
    """The run logged from ``text[start:]`` loaded a checkpoint at or after ``saved_before`` and ended on the
    reference curve, as did the whole log; returns the iteration it resumed from."""
    loaded = LOADED_LINE.search(text, start)
    assert loaded, text[start:][-3000:]
    resumed_from = int(loaded.group(2))
    assert saved_before <= resumed_from < ITERS and resumed_from % SAVE_INTERVAL == 0
    redone = losses_of(text[loaded.start():])
    assert sorted(redone) == list(range(resumed_from + 1, ITERS + 1)), text[start:][-3000:]
    assert_on_curve(redone, reference, redone)
    assert_on_curve(losses_of(text), reference, range(1, ITERS + 1))
    return resumed_from


def test_two_node_job_equals_one_process(slurm_cluster: SlurmCluster, job_env, reference, tmp_path: Path):
    log, save = tmp_path / "job.out", tmp_path / "ckpt"
    job_id = slurm_cluster.submit({**job_env, "SAVE_DIR": str(save)}, log)
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT_S, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, text[-4000:])
    assert "node 0/2 (node1), 2 ranks on cpu, rendezvous node1:" in text
    assert "node 1/2 (node2), 2 ranks on cpu, rendezvous node1:" in text
    assert "TP=1 PP=1 EP=2 DP=4" in text
    assert "restart:" not in text
    losses = losses_of(text)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert_on_curve(losses, reference, range(1, ITERS + 1))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)


def test_lost_node_requeues_and_resumes_on_the_same_curve(slurm_cluster: SlurmCluster, job_env, reference,
                                                          tmp_path: Path):
    log, save = tmp_path / "job.out", tmp_path / "ckpt"
    job_id = slurm_cluster.submit({**job_env, "SAVE_DIR": str(save)}, log)
    saved = _wait_for_checkpoint(slurm_cluster, job_id, save, log)
    slurm_cluster.run("scontrol", "update", "nodename=node2", "state=down", "reason=slurm tier: node lost")
    lost_at = max(losses_of(log.read_text()), default=0)
    assert lost_at < ITERS, "the job ended before the node was taken down"
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT_S, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-4000:])
    assert "DUE TO NODE FAILURE" in text
    line = re.search(r"pretrain_slurm\.sbatch: restart: SLURM requeued job (\d+) \(restart 1; the previous run "
                     r"was cancelled due to node failure\); resuming from iteration (\d+) \((\S+)\)", text)
    assert line, text[-4000:]
    assert int(line.group(1)) == job_id and line.group(3) == str(save)
    resumed_from = _check_resumed_run(text, line.end(), reference, saved)
    assert int(line.group(2)) == resumed_from
    print(f"\nnode2 lost after iteration {lost_at}; requeued, resumed from {resumed_from}\n"
          + curves_table({"uninterrupted": reference, "node-lost job": losses_of(text)}))


def test_killed_rank_restarts_from_the_last_checkpoint(slurm_cluster: SlurmCluster, job_env, reference,
                                                       tmp_path: Path):
    log, save = tmp_path / "job.out", tmp_path / "ckpt"
    job_id = slurm_cluster.submit({**job_env, "SAVE_DIR": str(save), "MAX_RESTARTS": "1"}, log)
    saved = _wait_for_checkpoint(slurm_cluster, job_id, save, log)
    pid = slurm_cluster.rank_pid(job_id, rank=3)  # the last rank, which logs the losses
    assert pid is not None, "rank 3 not found"
    os.kill(pid, signal.SIGKILL)
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT_S, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, text[-4000:])  # not requeued
    line = re.search(r" > restart: torchrun restarted the ranks after a rank failed \(restart 1 of --max-restarts 1\); "
                     r"resuming from iteration (\d+) \((\S+)\)", text)
    assert line, text[-4000:]
    assert line.group(2) == str(save)
    # The first round started from scratch: the only "loaded checkpoint" line is the restarted round's.
    resumed_from = _check_resumed_run(text, 0, reference, saved)
    assert int(line.group(1)) == resumed_from


@pytest.mark.parametrize("case", ["wrong data path", "tokenizer that did not make the data"])
def test_bad_input_fails_once_fast_and_is_not_requeued(slurm_cluster: SlurmCluster, job_env, slurm_data,
                                                       tmp_path: Path, case: str):
    log = tmp_path / "job.out"
    if case == "wrong data path":
        env = {**job_env, "DATA_PATH": str(tmp_path / "missing" / "corpus_text_document")}
        error = f"pretrain_moc.py: error: {tmp_path}/missing/corpus_text_document.idx: no such file"
    else:
        env = {**job_env, "TOKENIZER": slurm_data["other_tokenizer"]}
        error = f"pretrain_moc.py: error: tokenizer mismatch: dataset {slurm_data['data']}.idx was made with"
    started = time.monotonic()
    job_id = slurm_cluster.submit({**env, "SAVE_DIR": str(tmp_path / "ckpt")}, log)
    info = slurm_cluster.wait_done(job_id, 120, log)
    took = time.monotonic() - started
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    assert text.count(error) == 1 and text.count("error:") == 1, text  # once: no rank started, no torchrun retry
    assert "ranks on cpu" not in text and not (tmp_path / "ckpt").exists()
    assert took < 60, f"took {took:.0f}s"
    time.sleep(3)  # a requeue would be visible by now (BeginTime is set at once)
    assert slurm_cluster.job(job_id)["JobState"] == "FAILED" and slurm_cluster.job(job_id)["Restarts"] == "0"


def test_torchrun_script_on_both_nodes_by_one_srun(slurm_cluster: SlurmCluster, job_env, reference, tmp_path: Path):
    log, save = tmp_path / "srun.out", tmp_path / "ckpt"
    env = slurm_cluster.env({**job_env, "SAVE_DIR": str(save), "MAX_RESTARTS": "2", "NNODES": "2",
                             "MASTER_PORT": str(free_port()), "RDZV_ID": "srun-test"})
    node_script = ('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
                   f'NODE_RANK=$SLURM_NODEID exec bash {TORCHRUN_SCRIPT}')
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--job-name=torchrun-srun",
           "bash", "-c", node_script]
    assert run_group(cmd, env, JOB_TIMEOUT_S, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "node 0/2 (node1), 2 ranks on cpu, rendezvous node1:" in text
    assert "node 1/2 (node2), 2 ranks on cpu, rendezvous node1:" in text
    assert text.count("max restarts 2: pretrain_moc.py") == 2
    assert_on_curve(losses_of(text), reference, range(1, ITERS + 1))
