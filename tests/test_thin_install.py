"""The login-node install (`pip install hpcnlp`, requirements/submit.txt): check, submit, status and sweep
work without the training stack and never import it. The fast test looks at this venv's sys.modules; the
slow one builds a venv without torch (hash-checked wheels of the submit lock, served by pip's config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

import pytest
import yaml
from helpers import REPO

HEAVY = ("torch", "transformers", "datasets", "pandas", "pyarrow")

# Runs hpcnlp's CLI in process, then says which heavy modules got imported (stdout's last line).
PROBE = """
import sys
from hpcnlp.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def probe(python: str, *argv: str, env: dict | None = None) -> dict:
    code = f"import json\nHEAVY = {HEAVY!r}\n{PROBE}"
    r = subprocess.run([python, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.strip(), r.stderr
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr, "stdout": r.stdout}


@pytest.mark.parametrize("argv", [["check", "--help"], ["submit", "--help"], ["status", "{run}"]])
def test_cli_commands_import_no_training_library(argv, tmp_path):
    """Here, with the stack installed: the parser, the job registry, the logging set-up and `status` of a
    run load none of it (stderr is a pipe here, as in a batch job: no datasets import for its progress bars)."""
    (tmp_path / "status.json").write_text(json.dumps({"state": "succeeded", "job": "finetune"}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = probe(sys.executable, *[a.format(run=tmp_path) for a in argv], env=env)
    assert result["code"] == 0, result["stderr"]
    assert result["heavy"] == []


@pytest.fixture(scope="module")
def thin_python(tmp_path_factory) -> str:
    """A venv with only the submit lock (--require-hashes, --no-deps) and hpcnlp itself (-e, --no-deps)."""
    root = tmp_path_factory.mktemp("thin") / "venv"
    venv.create(root, with_pip=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    lock = REPO / "requirements" / "submit.txt"
    subprocess.run([*pip, "--require-hashes", "-r", str(lock)], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, "-e", str(REPO)], check=True, capture_output=True, timeout=600)
    return str(root / "bin" / "python")


@pytest.fixture
def login_node(tmp_path, monkeypatch, fake_slurm):
    """A working dir with the shipped jobs/ and data/, a GPU cluster profile, the fake Slurm on PATH."""
    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump({"account": "nlp", "partition": "gpu", "gpus_per_node": 4}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCNLP_CLUSTER", str(profile))
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return tmp_path


@pytest.mark.slow
def test_login_node_install_checks_and_submits_without_torch(thin_python, login_node, fake_slurm):
    r = subprocess.run([thin_python, "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    for config in ("pipeline.yaml", "finetune-sentiment.yaml", "finetune-ner.yaml", "pretrain.yaml", "cluster.yaml"):
        result = probe(thin_python, "check", "--config", f"jobs/{config}")
        assert result["code"] == 0, (config, result["stderr"])
        assert result["heavy"] == [], config
    # The checks that need the stack say so, one line each, and are left to the job's start.
    result = probe(thin_python, "check", "--config", "jobs/finetune-sentiment.yaml")
    notes = [line for line in result["stderr"].splitlines() if line.startswith("note: ")]
    assert notes and all(line.endswith("checked at job start") for line in notes)

    result = probe(thin_python, "submit", "--dry-run", "--config", "jobs/finetune-sentiment.yaml")
    assert result["code"] == 0 and result["heavy"] == [], result["stderr"]
    assert "sbatch" in result["stdout"]
    assert fake_slurm.calls("sbatch") == []  # a dry run queues nothing

    # Before the submit below: a sweep never writes into a dir that holds another run (its status.json).
    sweep = ["sweep", "--dry-run", "--config", "jobs/finetune-sentiment.yaml", "--overrides-list"]
    result = probe(thin_python, *sweep, "training.learning_rate=1e-4", "training.learning_rate=3e-4")
    assert result["code"] == 0 and result["heavy"] == [], result["stderr"]
    assert "--array=0-1" in result["stdout"]

    result = probe(thin_python, "submit", "--config", "jobs/finetune-sentiment.yaml")
    assert result["code"] == 0 and result["heavy"] == [], result["stderr"]
    assert len(fake_slurm.calls("sbatch")) == 1

    result = probe(thin_python, "status", "jobs/finetune-sentiment.yaml")
    assert result["code"] == 0 and result["heavy"] == [], result["stderr"]
    assert "1001" in result["stdout"]

    result = probe(thin_python, "doctor")  # a login node: no torch, no GPU, no allocation; nothing contradicts
    assert result["code"] == 0, result["stderr"]
    assert "not measured (no torch here)" in result["stdout"] and "doctor: nothing contradicts" in result["stdout"]


def test_checks_that_need_the_stack_become_notes_without_it(tmp_path, monkeypatch, capsys):
    """In process, the stack hidden: report_to, the adapter's modules, extra TrainingArguments keys, the
    packaged model and the CSV columns are left to the job's start (one note each); the rest still refuses."""
    from hpcnlp.cli import main
    from hpcnlp.runtime import stack

    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCNLP_CLUSTER", str(tmp_path / "no-profile.yaml"))
    (tmp_path / "no-profile.yaml").write_text("{}\n")
    monkeypatch.setattr(stack, "installed", lambda: False)
    stack.skipped.cache_clear()
    overrides = ["training.report_to=tensorboard", "adapter={r: 8}", "training.adam_beta2=0.99"]
    assert main(["check", "--config", "jobs/finetune-sentiment.yaml", *overrides]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    for what in ("training.report_to", "adapter.target_modules", "TrainingArguments", "minilm-l6", "train.csv"):
        assert any(what in line and line.endswith("checked at job start") for line in notes), what
    assert main(["check", "--config", "jobs/finetune-sentiment.yaml", "training.learning_rate=-1"]) == 2
    assert "training.learning_rate" in capsys.readouterr().err
