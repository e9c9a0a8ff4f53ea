"""The job contract: one registry of specs drives the CLI, templates, pipeline and checks; the code
has no import circles; the shared Trainer harness is pinned to exact losses."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml
from helpers import (
    CORPUS,
    REPO,
    SENTIMENT_DATA,
    export_config,
    preempt_at,
    tiny_pretrain,
    validate_config,
    write_config,
)

from hpcnlp.cli import build_parser
from hpcnlp.cluster.pipeline import run_pipeline
from hpcnlp.cluster.templates import render_template
from hpcnlp.jobs import JOBS, load_config
from hpcnlp.runtime import preempt

SRC = REPO / "src" / "hpcnlp"


def test_every_job_is_one_spec_and_everything_reads_the_registry():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, spec in JOBS.items():
        assert spec.config.model_fields["job"].default == name
        assert name in commands and commands[name].description == spec.help
        assert load_config(REPO / spec.example, check=False).job == name  # the shipped example is this job's
        # slurm/<job>.sbatch is the spec's header + the one shared launcher (`make templates` writes it)
        assert (REPO / "slurm" / f"{name}.sbatch").read_text() == render_template(spec), f"make templates ({name})"
    assert sorted(p.stem for p in (REPO / "slurm").glob("*.sbatch")) == sorted(JOBS)


def _imports(path: Path) -> set[str]:
    """hpcnlp modules a file imports, at any depth (inside functions too: those hide circles as well)."""
    modules = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__") for p in SRC.rglob("*.py")
    }
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpcnlp"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or {node.module}
    return out


def test_no_import_circles_in_src():
    graph = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): _imports(p)
        for p in SRC.rglob("*.py")
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep) :] + [module, dep]))
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_config_is_schema_only():
    """config.py imports nothing of hpcnlp (data, tasks, models) and reads no file but the YAML itself."""
    tree = ast.parse((SRC / "config.py").read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not {m for m in imported if m and m.startswith("hpcnlp")}
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"is_file", "is_dir", "exists", "glob", "iterdir", "stat"}


# --- the Trainer harness, pinned -----------------------------------------------------------------
def _logged_losses(out: Path, step: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


# Logged by this exact run (one thread, seed 11). A change in data order, masking, initialisation,
# optimizer or loss moves these; update them only for a change that is meant to change the numbers.
# Re-pinned when pretrain began reading the prepared shards in their shuffled order (#13), and when its
# attention_dropout default became 0 (#31: step 1 is the same, later steps differ by at most 0.011).
PINNED_LOSSES = [10.327, 10.3687, 10.3143, 10.2906, 10.2317, 10.2875]


@pytest.mark.slow
def test_seeded_run_logs_pinned_losses(tmp_path):
    import torch

    from hpcnlp.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # pinned fp32 losses: not training.bf16: auto's pick
        assert main(["pretrain", "--config", str(tiny_pretrain(tmp_path, bf16=False))]) == 0
    finally:
        torch.set_num_threads(threads)
    losses = _logged_losses(tmp_path / "out", 6)
    print("logged losses:", losses)
    # 1e-3: runs of the same code differed by up to 2e-4 at step 6 (kernels' summation order); a change of
    # data order, masking, init or optimizer moves the losses by far more (the prepared order moved step 2 by 0.05).
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-3)


@pytest.mark.slow
def test_tensorboard_keeps_one_curve_across_a_requeue(tmp_path, monkeypatch):
    """report_to: [tensorboard], offline: a run stopped at step 3 and resumed writes steps 1..6 once each,
    in one log dir, readable by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hpcnlp.cli import main

    config = tiny_pretrain(tmp_path, report_to=["tensorboard"], run_name="tiny-run")
    with monkeypatch.context() as m:
        preempt_at(m, 3)
        assert main(["pretrain", "--config", str(config)]) == preempt.REQUEUE_EXIT
    assert main(["pretrain", "--config", str(config), "resume=auto"]) == 0
    runs = tmp_path / "out" / "runs"
    assert list(runs.glob("events.out.tfevents.*")) and not [p for p in runs.iterdir() if p.is_dir()]  # one dir
    events = EventAccumulator(str(runs))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- pipelines ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_rerun_after_success_skips_every_stage(tmp_path, sentiment_teacher, capsys):
    """prepare -> export -> validate, run twice: the second run starts nothing (validate's finished
    state is its shipped bundle, prepare's its prepared data, not a metrics.json)."""
    prepare = write_config(
        tmp_path / "prepare.yaml",
        {
            "job": "prepare",
            "data": {
                "train_files": [str(CORPUS / "tutorial" / "introduction.rst.txt")],
                "max_seq_length": 32,
                "prepared_root": str(tmp_path / "prepared"),
            },
        },
    )
    export = export_config(tmp_path, sentiment_teacher)
    validate = validate_config(tmp_path, sentiment_teacher, str(tmp_path / "onnx"), SENTIMENT_DATA)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"name": "prepare", "config": str(prepare)},
                    {"name": "export", "config": str(export)},
                    {"name": "validate", "config": str(validate), "overrides": {"onnx_dir": "${export.output_dir}"}},
                ]
            }
        )
    )
    assert run_pipeline(str(pipeline), local=True) == 0
    first = capsys.readouterr().out
    assert all(f"{stage}: running" in first for stage in ("prepare", "export", "validate")), first
    assert run_pipeline(str(pipeline), local=True) == 0
    second = capsys.readouterr().out
    assert all(f"{stage}: complete, skipped" in second for stage in ("prepare", "export", "validate")), second
    assert "running" not in second and "PASSED" in second  # the table still reads the shipped bundle
