"""The slurm tier: a real two-node SLURM cluster on this machine (``scripts/slurm_local_cluster.sh``).

The session fixture ``slurm_cluster`` starts the cluster (installing SLURM with apt-get when missing) and
stops it at the end, also when a test failed, and checks that ``/etc/hosts`` is left as it was found. It
skips the tier, with one line saying why, only where SLURM cannot run (not root; no SLURM and no apt-get);
under CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_jobs import REPO_ROOT, SlurmCluster, tiny_job_env  # on sys.path under pytest, as tests/distributed

from moc_megatron.data.tokenizer_training import train_sentencepiece

CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm_local_cluster.sh"


def _why_no_slurm() -> str | None:
    """Why this machine cannot run the local cluster, or ``None`` if it can."""
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (daemons, /etc/hosts, UTS namespaces)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The running two-node cluster; stopped (every process it started ended, /etc/hosts restored) at the end."""
    reason = _why_no_slurm()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"slurm tier cannot run under CI: {reason}", pytrace=False)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm_cluster")
    hosts_before = Path("/etc/hosts").read_text()
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(folder)], capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(folder)], capture_output=True, timeout=120)
        pytest.fail(f"slurm_local_cluster.sh up failed: {up.stderr.strip() or up.stdout.strip()}", pytrace=False)
    cluster = SlurmCluster(folder)
    try:
        yield cluster
    finally:
        print("\n" + cluster.job_report())
        down = subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(folder)], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr
        assert Path("/etc/hosts").read_text() == hosts_before, "/etc/hosts was not restored"
        assert not cluster.leftover_processes(), f"left behind: {cluster.leftover_processes()}"


@pytest.fixture(autouse=True)
def _no_job_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no job of it still running, both nodes back in service."""
    yield
    if "slurm_cluster" not in request.fixturenames:
        return
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except (pytest.skip.Exception, pytest.fail.Exception):  # no cluster: nothing to reset
        return
    cluster.reset()


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, sp_model: str,
               tiny_texts: list[str], run_tool) -> dict[str, str]:
    """A dataset made with ``sp_model``, and a second tokenizer of the same size that did not make it."""
    import json

    root = tmp_path_factory.mktemp("slurm_data")
    assert run_tool("preprocess_data", "--input", tiny_corpus, "--output-prefix", root / "corpus",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--append-eod", "--no-progress") == 0
    half = root / "half.jsonl"
    half.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_texts[1::2] * 2))
    other = train_sentencepiece([str(half)], str(root / "other"), vocab_size=512, num_threads=1)
    return {"data": str(root / "corpus_text_document"), "tokenizer": sp_model, "other_tokenizer": other}


@pytest.fixture(scope="session")
def job_env(slurm_data: dict[str, str]) -> dict[str, str]:
    """The launchers' environment for the tests' tiny CPU job (the model and schedule of ``slurm_jobs``)."""
    return tiny_job_env(slurm_data["data"], slurm_data["tokenizer"])
