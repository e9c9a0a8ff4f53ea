"""The layout's promises (docs/architecture.md): arrows between packages run one way, no private name
crosses a module, and a job is its own files: a toy job in a package outside the checkout is checked,
run and dry-run submitted without touching any file of hpcnlp."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO

SRC = REPO / "src" / "hpcnlp"

# Lower rank = lower layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = {
    "hpcnlp.config": 0,
    "hpcnlp.runtime": 0,
    "hpcnlp.spec": 0,
    "hpcnlp.data": 1,
    "hpcnlp.models": 1,
    "hpcnlp.report": 1,
    "hpcnlp.metrics": 1,
    "hpcnlp.tasks": 2,
    "hpcnlp.train": 2,
    "hpcnlp.checks": 2,
    "hpcnlp.ship": 3,
    "hpcnlp.jobs": 4,
    "hpcnlp.cluster": 5,
    "hpcnlp.cli": 6,
    "hpcnlp.__main__": 6,
}


def _module(path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(
        f"{module}: in no layer of tests/test_architecture.py (add it there and to docs/architecture.md)"
    )


def _imports(path):
    """(module, names) of every hpcnlp import in a file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.startswith("hpcnlp"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpcnlp"):
            yield node.module, [a.name for a in node.names]


def test_arrows_run_down():
    up = []
    for path in sorted(SRC.rglob("*.py")):
        here = _module(path)
        for module, names in _imports(path):
            targets = [
                f"{module}.{n}"
                for n in names
                if (SRC.parent / f"{module}.{n}".replace(".", "/")).exists()
                or (SRC.parent / (f"{module}.{n}".replace(".", "/") + ".py")).exists()
            ] or [module]
            up += [f"{here} -> {t}" for t in targets if _layer(t) > _layer(here)]
    assert not up, "a lower module imports a higher one:\n" + "\n".join(up)


def test_no_private_name_crosses_a_module():
    crossing = [
        f"{_module(p)}: from {m} import {n}"
        for p in SRC.rglob("*.py")
        for m, names in _imports(p)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not crossing, "\n".join(crossing)


TOY_JOB = '''
"""A site's own job: one module, nothing else."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from hpcnlp.config import JobConfig, Problem
from hpcnlp.spec import JobSpec


class HelloConfig(JobConfig):
    job: Literal["hello"] = "hello"
    greeting: str = "hello"


def check(cfg: HelloConfig, pending=()) -> list[Problem]:
    return [] if cfg.greeting.strip() else [Problem(key="greeting", message="is empty", fix="say something")]


def run(cfg: HelloConfig) -> int:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"job": "hello", "greeting": cfg.greeting}))
    return 0


SPEC = JobSpec(name="hello", help="say hello (a toy job)", config=HelloConfig, check=check, run=run,
               single_process=True)
'''


def test_a_new_job_is_its_own_module_and_nothing_else(tmp_path):
    pkg = tmp_path / "site_jobs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hello.py").write_text(textwrap.dedent(TOY_JOB))
    (tmp_path / "hello.yaml").write_text(f"job: hello\noutput_dir: {tmp_path / 'out'}\ngreeting: hi there\n")
    before = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True, text=True
    ).stdout
    env = {
        **os.environ,
        "HPCNLP_JOB_PACKAGES": "site_jobs",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{SRC.parent}",
        "HPCNLP_STATE_DIR": str(tmp_path / "state"),
        "HPCNLP_CLUSTER": str(tmp_path / "no-profile.yaml"),
    }
    (tmp_path / "no-profile.yaml").write_text("{}\n")

    def hpcnlp(*args):
        return subprocess.run(
            [sys.executable, "-m", "hpcnlp", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )

    ok = hpcnlp("check", "--config", "hello.yaml")
    assert ok.returncode == 0 and "valid 'hello' config" in ok.stdout, ok.stderr
    bad = hpcnlp("check", "--config", "hello.yaml", "greeting=' '")
    assert bad.returncode == 2 and "greeting: is empty" in bad.stderr, bad.stderr
    assert "hello" in hpcnlp("--help").stdout
    ran = hpcnlp("hello", "--config", "hello.yaml")
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "status.json").is_file()
    dry = hpcnlp("submit", "--config", "hello.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "sbatch" in dry.stdout and "hello.sbatch" in dry.stdout, dry.stdout
    after = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert after == before, "the toy job touched the checkout"


@pytest.mark.parametrize("name", ["sequence-classification", "token-classification", "fill-mask"])
def test_every_task_is_one_module(name):
    from hpcnlp import tasks

    task = tasks.get(name)
    assert (SRC / "tasks" / (name.replace("-", "_") + ".py")).is_file()
    assert task.labelled == (task.primary_metric is not None)
    if task.labelled:  # what a labelled task must say for finetune, distill, validate and the card
        assert task.reader and task.collator and task.compute_metrics and task.score and task.batch_metrics
        assert task.encode and task.data_formats and task.peft_task_type
