"""Real-Slurm fixtures: one local cluster (munge + slurmctld + 2 slurmd) for the whole session.

Jobs are submitted from a tmp dir with HPCNLP_HOME pointing at the repo, so logs (%x-%j.out) and
launcher state land in tmp, never in the checkout. Job helpers are in cluster_jobs.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_harness import LocalSlurm, can_run  # noqa: E402

from cluster_jobs import CORPUS, REPO  # noqa: E402


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = can_run()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    for name in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt"):
        (out / Path(name).name).write_bytes((CORPUS / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def job_env(slurm) -> dict:
    """Environment for sbatch: the cluster's SLURM_CONF, one thread per process, offline HF."""
    return {**slurm.env, "HPCNLP_HOME": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
