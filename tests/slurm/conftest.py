"""Real-Slurm fixtures: one local cluster (munge + slurmctld + 2 slurmd) for the whole session, and
the production-like site (`site`: LocalSlurm(site=True), for test_production_site.py) while its module runs.

Jobs are submitted from a tmp dir with HPCNLP_HOME pointing at the repo, so logs (%x-%j.out) and
launcher state land in tmp, never in the checkout. Job helpers are in cluster_jobs.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster_jobs import CORPUS, REPO  # noqa: E402
from slurm_harness import LocalSlurm, can_run  # noqa: E402


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = can_run()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    # Each xdist worker runs its own cluster: job ids of its own, since launchers derive rendezvous ports
    # from them (two clusters' job 1 would both listen on one port). The site's start at 5001.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, first_job_id=1 + 2000 * worker).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    for name in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt"):
        (out / Path(name).name).write_bytes((CORPUS / name).read_bytes())
    return out


def job_environment(cluster: LocalSlurm) -> dict:
    """Environment for sbatch: the cluster's SLURM_CONF, one thread per process, offline HF."""
    return {
        **cluster.env,
        "HPCNLP_HOME": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def job_env(slurm) -> dict:
    return job_environment(slurm)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The production-like site (LocalSlurm(site=True): task/affinity, fake GPUs, preemption, slurmdbd +
    MariaDB), for tests/slurm/test_production_site.py only: the other tests keep the friendly cluster, whose two
    unbound nodes do not share one core (see docs/reliability.md, "The test site")."""
    reason = can_run()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    # Job ids of its own: launchers derive rendezvous ports from them, and the friendly cluster may be up.
    cluster = LocalSlurm(tmp_path_factory.mktemp("site"), nodes=2, site=True, first_job_id=5001).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def site_env(site) -> dict:
    return job_environment(site)
