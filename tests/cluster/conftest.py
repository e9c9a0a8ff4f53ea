"""Real-Slurm fixtures: one local cluster (munge + slurmctld + 2 slurmd) for the whole session.

Jobs are submitted from a tmp dir with HPCNLP_HOME pointing at the repo, so logs (%x-%j.out) and
launcher state land in tmp, never in the checkout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from slurm_harness import LocalSlurm, can_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus" / "python-docs"


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


@pytest.fixture
def job_env(slurm, tmp_path) -> dict:
    """Environment for sbatch: the cluster's SLURM_CONF, one thread per process, offline HF."""
    return {**slurm.env, "HPCNLP_HOME": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def tiny_pretrain(tmp: Path, corpus: Path, prepared: Path, name: str = "out", **training) -> Path:
    """A real pretrain config small enough for 2 shared cores: a 2-layer BERT from scratch."""
    cfg = {
        "job": "pretrain", "init": "scratch", "output_dir": str(tmp / name),
        "scratch": {"vocab_size": 800, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64},
        "data": {"train_files": [str(corpus / "*.rst.txt")], "max_seq_length": 32, "eval_fraction": 0.05,
                 "prepared_root": str(prepared)},
        "training": {"max_steps": 12, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
                     "learning_rate": 1e-3, "logging_steps": 2, "eval_strategy": "no", "save_steps": 4,
                     "save_total_limit": None, "seed": 7, **training},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def log_of(slurm, job_id: str) -> str:
    path = slurm.job(job_id).get("StdOut")
    return Path(path).read_text() if path and os.path.exists(path) else ""
