"""scripts/slurm_local_cluster.sh: idempotent verbs and one-line errors (the running cluster is the session's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from slurm_jobs import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.slurm

SCRIPT = REPO_ROOT / "scripts" / "slurm_local_cluster.sh"


def _script(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script (as ``user``: fed on stdin, since that user may not read the checkout)."""
    if user is None:
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "bash", "-s", *args],
                          input=SCRIPT.read_text(), capture_output=True, text=True, timeout=120, cwd="/")


def test_up_again_keeps_the_running_cluster(slurm_cluster: SlurmCluster):
    pids = (slurm_cluster.folder / "pids").read_text()
    again = _script("up", str(slurm_cluster.folder))
    assert again.returncode == 0 and "already up" in again.stdout, again.stderr
    assert (slurm_cluster.folder / "pids").read_text() == pids
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N=%t").split() == ["node1=idle", "node2=idle"]
    hostnames = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "hostname").split()
    assert sorted(hostnames) == ["node1", "node2"]  # each node its own hostname (UTS namespace)


def test_down_of_a_stopped_cluster_and_errors_are_one_line(tmp_path: Path, slurm_cluster: SlurmCluster):
    stopped = _script("down", str(tmp_path / "never-started"))
    assert stopped.returncode == 0 and "not running" in stopped.stdout
    assert "moc-slurm-local-cluster" in Path("/etc/hosts").read_text()  # the session's cluster is untouched
    usage = _script("start")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "usage:" in usage.stderr
    not_root = _script("up", str(tmp_path / "x"), user="65534")
    assert not_root.returncode == 1 and not_root.stderr.count("\n") == 1, not_root.stderr
    assert not_root.stderr.startswith("slurm_local_cluster.sh: error: must run as root")
    clash = _script("up", str(tmp_path / "second"))  # node1/node2 already name the session's cluster
    assert clash.returncode == 1 and clash.stderr.count("\n") == 1, clash.stderr
    assert "already names node1" in clash.stderr
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N=%t").split() == ["node1=idle", "node2=idle"]
