"""Unattended runs: nothing is lost, corrupted or silently redone. Checkpoint markers, run identity,
the output_dir lock, overwrite, ownership of output dirs, status.json and the outcome line the batch
script turns into its exit code, requeue caps, the step watchdog. Real tiny runs, no mocks; the real
Slurm side (requeues, chaos) is in tests/slurm/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    SENTIMENT_DATA,
    export_config,
    preempt_at,
    prepare_corpus,
    run_cli,
    tiny_pretrain,
    torchrun_command,
    torchrun_env,
    write_config,
)

from hpcnlp.runtime import rundir
from hpcnlp.runtime.checkpoints import MARKER, mark_complete, newest_complete_checkpoint


def _checkpoint(out: Path, step: int, run: str = "r1", marked: bool = True) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 100)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(ckpt, run)
    return ckpt


def test_resume_takes_the_newest_marked_checkpoint_of_this_run(tmp_path, caplog):
    out = tmp_path / "out"
    good = _checkpoint(out, 2)
    _checkpoint(out, 4, run="another-config")  # another run's: never resumed
    truncated = _checkpoint(out, 6)
    (truncated / "model.safetensors").write_bytes(b"w" * 10)  # cut short after the marker listed 100 bytes
    _checkpoint(out, 8, marked=False)  # killed mid-save: no marker
    unreadable = _checkpoint(out, 10)
    (unreadable / "trainer_state.json").write_text("{not json")
    assert newest_complete_checkpoint(out, "r1") == good
    skipped = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
    assert len(skipped) == 4, skipped  # one line per skipped checkpoint, newest first, with the reason
    assert "unreadable" in skipped[0] and "incomplete" in skipped[1] and "truncated" in skipped[2]
    assert "another run" in skipped[3]
    assert json.loads((good / MARKER).read_text())["files"]["model.safetensors"] == 100


def test_a_marker_that_lists_no_files_or_no_weights_is_not_complete(tmp_path):
    """`files: []` crashed resume; a marker with no files key (and no weights) counted as complete."""
    from hpcnlp.runtime.checkpoints import problem

    for files, why in (
        ([], "lists no files"),
        (None, "lists no files"),
        ({"trainer_state.json": 2}, "no model weights"),
        ({"model.safetensors": "100"}, "lists no files"),
    ):
        ckpt = _checkpoint(tmp_path / str(why) / str(type(files).__name__), 2)
        marker = json.loads((ckpt / MARKER).read_text())
        if files is None:
            del marker["files"]
        else:
            marker["files"] = files
        (ckpt / MARKER).write_text(json.dumps(marker))
        assert why in problem(ckpt, "r1")
        assert newest_complete_checkpoint(ckpt.parent, "r1") is None


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from hpcnlp.runtime import rundir; rundir.acquire({str(out)!r}); print(1, flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(rundir.OutputDirRefused, match=f"in use by pid {holder.pid} on "):
            rundir.acquire(out)
    finally:
        holder.kill()
        holder.wait()
    assert rundir.acquire(out) == rundir.lock_path(out)  # the holder died: the kernel freed its flock
    assert json.loads(rundir.lock_path(out).read_text())["pid"] == os.getpid()
    rundir.release(out)
    assert rundir.lock_holder(out) is None and rundir.holder_alive(out) is False


@pytest.mark.slow
def test_overwrite_never_mixes_runs_and_keeps_the_old_one_until_the_new_one_finished(tmp_path, monkeypatch):
    config = tiny_pretrain(tmp_path)
    assert run_cli("pretrain", "--config", str(config)) == 0
    out = tmp_path / "out"
    first = json.loads((out / "run.json").read_text())
    (out / "checkpoint-99").mkdir()  # a later checkpoint of the old run: must not be resumed or kept
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "files": [*run["files"], "checkpoint-99"]}))
    with monkeypatch.context() as m:  # the rerun is preempted: the old run stays aside, whole
        preempt_at(m, 3)
        assert run_cli("pretrain", "--config", str(config), "overwrite=true") == 75
    aside = list(tmp_path.glob(".out.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.json").is_file() and (aside[0] / "checkpoint-99").is_dir()
    assert not (out / "metrics.json").exists() and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] == 3
    assert run_cli("pretrain", "--config", str(config), "resume=auto") == 0  # continues the new run
    assert not list(tmp_path.glob(".out.replaced-*"))  # gone only now
    second = json.loads((out / "run.json").read_text())
    assert second["run"] == first["run"] and len(second["starts"]) == 2
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-3")
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_a_rerun_upstream_stage_makes_the_next_stage_another_run(tmp_path):
    """A pipeline re-ran its upstream stage: the downstream stage's old checkpoints are not this run's."""
    import hashlib
    import shutil

    import yaml

    from hpcnlp.checks import output_dir as output_dir_problems
    from hpcnlp.jobs import load_config
    from hpcnlp.models import resolve_model_path

    upstream, out = tmp_path / "finetune", tmp_path / "distill"
    shutil.copytree(resolve_model_path("minilm-l6"), upstream)  # stands for the finetune stage's output
    (upstream / "run.json").write_text(json.dumps({"run": "up-1", "files": []}))
    cfg = load_config("jobs/distill.yaml", [f"teacher={upstream}", f"output_dir={out}", "resume=auto"], check=False)
    before = rundir.run_hash(cfg.model_dump(mode="json"))
    assert before != rundir.run_hash({**cfg.model_dump(mode="json"), "teacher": "minilm-l6"})
    _checkpoint(out, 4, run=before)
    (out / "run.json").write_text(json.dumps({"run": before, "files": ["checkpoint-4"]}))
    assert output_dir_problems(cfg, "auto") == []  # same upstream weights: its own run, resumed
    assert rundir.run_hash(cfg.model_dump(mode="json")) == before
    time.sleep(0.01)
    (upstream / "model.safetensors").write_bytes((upstream / "model.safetensors").read_bytes())  # re-run
    problems = output_dir_problems(cfg, "auto")
    assert len(problems) == 1 and "holds a run of another config" in problems[0].message
    # An ensemble of teachers: re-running any one of them makes another run too.
    ensemble = {**cfg.model_dump(mode="json"), "teacher": ["minilm-l6", str(upstream)]}
    first = rundir.run_hash(ensemble)
    time.sleep(0.01)
    (upstream / "model.safetensors").write_bytes((upstream / "model.safetensors").read_bytes())
    assert rundir.run_hash(ensemble) != first
    # Fixed inputs (a package alias) keep the hash they always had.
    plain = {"job": "x", "model_name_or_path": "minilm-l6"}
    assert rundir.run_hash(plain) == hashlib.sha256(yaml.safe_dump(plain, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.slow
def test_resume_refuses_another_configs_checkpoints(tmp_path, monkeypatch, capsys):
    config = tiny_pretrain(tmp_path)
    with monkeypatch.context() as m:
        preempt_at(m, 3)
        assert run_cli("pretrain", "--config", str(config)) == 75
    assert run_cli("pretrain", "--config", str(config), "resume=auto", "training.learning_rate=0.1") == 2
    assert "holds a run of another config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_signal_after_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    config = tiny_pretrain(tmp_path)
    preempt_at(monkeypatch, 6)  # max_steps: the checkpoint request comes with the last step
    assert run_cli("pretrain", "--config", str(config)) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_preemption_checkpoint_survives_best_model_rotation(tmp_path, monkeypatch):
    """finetune with load_best_model_at_end and save_total_limit 1: the Trainer deletes every
    checkpoint but the best at the end of train(); the preemption checkpoint must stay."""
    data = {**SENTIMENT_DATA, "max_train_samples": 64, "max_eval_samples": 32}
    config = write_config(
        tmp_path / "ft.yaml",
        {
            "job": "finetune",
            "task": "sequence-classification",
            "output_dir": str(tmp_path / "out"),
            "data": data,
            "training": {
                "max_steps": 6,
                "per_device_train_batch_size": 8,
                "eval_strategy": "steps",
                "eval_steps": 2,
                "save_strategy": "steps",
                "save_steps": 2,
                "save_total_limit": 1,
                "logging_steps": 1,
                "load_best_model_at_end": True,
                "metric_for_best_model": "loss",
                "seed": 3,
            },
        },
    )
    with monkeypatch.context() as m:
        preempt_at(m, 3)
        assert run_cli("finetune", "--config", str(config)) == 75
    assert newest_complete_checkpoint(tmp_path / "out").name == "checkpoint-3"
    assert run_cli("finetune", "--config", str(config), "resume=auto") == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["global_step"] == 6 and m["resumed_from"].endswith("checkpoint-3")


@pytest.mark.parametrize("restarts,expected", [("0", "75 requeue"), ("3", "75 stop")])
@pytest.mark.slow
def test_outcome_line_requeues_until_max_requeues(tmp_path, monkeypatch, restarts, expected):
    """What slurm/launch.sh reads: requeue only after a saved checkpoint, at most max_requeues times."""
    config = tiny_pretrain(tmp_path)
    outcome = tmp_path / "outcome"
    monkeypatch.setenv("HPCNLP_OUTCOME_FILE", str(outcome))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)  # a requeued job resumes whatever resume: says
    preempt_at(monkeypatch, 3)
    assert run_cli("pretrain", "--config", str(config)) == 0  # under launch.sh: exit 0, the outcome carries 75
    line = outcome.read_text()
    assert line.startswith(expected), line
    if restarts == "3":
        assert "max_requeues (3)" in line and "resume: auto" in line
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "preempted" and status["slurm_job_ids"] == ["4242"]


def test_export_never_replaces_what_it_did_not_write(tmp_path, capsys):
    foreign = tmp_path / "onnx"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    assert run_cli("export", "--config", str(export_config(tmp_path, str(model)))) == 2
    assert "holds files hpcnlp did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert run_cli("check", "--config", str(export_config(tmp_path, str(model), output_dir=str(model)))) == 2
    assert "overlaps the input model_name_or_path" in capsys.readouterr().err
    assert run_cli("check", "--config", str(export_config(tmp_path, str(model), output_dir=str(tmp_path)))) == 2


def test_validate_refuses_rejected_dir_inside_output_dir(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "v.yaml",
        {
            "job": "validate",
            "name": "m",
            "version": "1",
            "model_name_or_path": "minilm-l6",
            "onnx_dir": str(tmp_path),
            "output_dir": str(tmp_path / "artifacts"),
            "rejected_dir": str(tmp_path / "artifacts" / "rejected"),
            "data": SENTIMENT_DATA,
        },
    )
    assert run_cli("check", "--config", str(cfg)) == 2
    assert "rejected_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_naming_it(tmp_path):
    """2 processes under torchrun; rank 1 is stopped (SIGSTOP) mid-training: the watchdog fails the job
    within step_timeout_minutes, and the outcome line names rank 1, long before the gloo timeout."""
    config = tiny_pretrain(tmp_path, max_steps=100000, save_steps=100000, logging_steps=5)
    prepare_corpus(config)
    outcome = tmp_path / "outcome"
    cmd = torchrun_command(["pretrain", "--config", str(config), "step_timeout_minutes=0.2"])
    proc = subprocess.Popen(
        cmd,
        env=torchrun_env({"HPCNLP_OUTCOME_FILE": str(outcome)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, pid, t0 = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "rank 1 of 2 ready" in line:
                pid = int(line.split("(pid ")[1].split()[0])
            if pid and "step 10/" in line:
                os.kill(pid, signal.SIGSTOP)
                t0 = time.monotonic()
                break
        assert t0, "".join(lines[-30:])
        proc.wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        if pid:
            for sig in (signal.SIGKILL, signal.SIGCONT):  # never leave a stopped process behind
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    assert proc.returncode != 0 and waited < 60  # a 12 s limit (+ torchrun's teardown), not the 30 min timeout
    line = outcome.read_text()
    assert line.startswith("4 stop rank 0 on ") and "stalled: rank 1 on " in line, line
    st = json.loads((tmp_path / "out" / "status.json").read_text())  # rank 0, the lock holder, said it too
    assert st["state"] == "failed" and "stalled: rank 1 on " in st["reason"], st


@pytest.mark.slow
def test_finetune_resumed_mid_epoch_sees_the_same_batches(tmp_path, monkeypatch):
    """group_by_length on, 2 epochs of 8 steps: preempted in epoch 1 and again in epoch 2, resumed each
    time; every logged loss equals the uninterrupted run's (the same batches, in the same order)."""
    data = {**SENTIMENT_DATA, "max_train_samples": 64, "max_eval_samples": 16}

    def config(name):
        return write_config(
            tmp_path / f"{name}.yaml",
            {
                "job": "finetune",
                "task": "sequence-classification",
                "output_dir": str(tmp_path / name),
                "data": data,
                "training": {
                    "num_train_epochs": 2,
                    "per_device_train_batch_size": 8,
                    "eval_strategy": "no",
                    "save_strategy": "steps",
                    "save_steps": 16,
                    "load_best_model_at_end": False,
                    "logging_steps": 1,
                    "group_by_length": True,
                    "learning_rate": 1e-4,
                    "seed": 5,
                    "bf16": False,  # runs compared: one dtype, not training.bf16: auto's pick
                },
            },
        )

    def losses(name):  # every step's loss, from the last checkpoint's history (carried across resumes)
        state = json.loads((tmp_path / name / "checkpoint-16" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    assert run_cli("finetune", "--config", str(config("whole"))) == 0
    for step in (5, 11):  # mid-epoch 1, mid-epoch 2
        with monkeypatch.context() as m:
            preempt_at(m, step)
            assert run_cli("finetune", "--config", str(config("resumed")), "resume=auto") == 75
    assert run_cli("finetune", "--config", str(config("resumed")), "resume=auto") == 0
    assert losses("resumed") == pytest.approx(losses("whole"), abs=1e-4)
    assert len(losses("whole")) == 16


@pytest.mark.slow
def test_restart_cost_does_not_grow_with_the_steps_done(tmp_path, monkeypatch):
    """A resumed run skips the batches already trained by index, without building them: resumed at step
    10 or at step 100, it collates only the batches still to train (+ dataloader prefetch). The seconds
    from start to the first new step are printed for both (timings belong to benchmarks, not asserts)."""
    from hpcnlp.runtime import preempt
    from hpcnlp.train import mlm

    built, first_step = [], {}
    collate = mlm.MLMCollator.__call__

    def counting(self, features):
        if "labels" not in features[0]:  # a training batch (eval batches come pre-masked)
            built.append(1)
        return collate(self, features)

    original_step_end = preempt.PreemptionCallback.on_step_end

    def timed(self, args, state, control, **kw):
        first_step.setdefault("t", time.perf_counter())
        return original_step_end(self, args, state, control, **kw)

    results = {}
    for done in (10, 100):
        config = tiny_pretrain(tmp_path, f"r{done}.yaml", max_steps=120, save_steps=1000, logging_steps=50)
        out = f"output_dir={tmp_path / f'r{done}'}"
        with monkeypatch.context() as m:
            preempt_at(m, done)
            assert run_cli("pretrain", "--config", str(config), out) == 75
        with monkeypatch.context() as m:
            m.setattr(mlm.MLMCollator, "__call__", counting)
            m.setattr(preempt.PreemptionCallback, "on_step_end", timed)
            built.clear()
            first_step.clear()
            t0 = time.perf_counter()
            assert run_cli("pretrain", "--config", str(config), out, "resume=auto") == 0
        results[done] = (len(built), first_step["t"] - t0)
        assert 120 - done <= len(built) <= 120 - done + 2, (done, len(built))
    print(f"resumed at step 10: {results[10][1]:.2f} s to the first new step; at step 100: {results[100][1]:.2f} s")


@pytest.mark.slow
def test_training_outputs_get_the_umask_modes(tmp_path):
    """safetensors writes 0600 whatever the umask: under 027 the group must still read the model."""
    old = os.umask(0o027)
    try:
        assert run_cli("pretrain", "--config", str(tiny_pretrain(tmp_path))) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "metrics.json", "report.md", "run.json"):
        mode = (tmp_path / "out" / name).stat().st_mode & 0o777
        assert mode == 0o640, (name, oct(mode))
