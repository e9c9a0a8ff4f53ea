"""MLflow and W&B (training.report_to), offline, for real: one tracking run per hpcnlp run across a
preemption and its requeue, every step logged once, the resolved config as params; `hpcnlp sync`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cli, preempt_at, tiny_pretrain

from hpcnlp.cli import main
from hpcnlp.runtime import preempt
from hpcnlp.train.tracking import flat_params

TRACKING_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    "MLFLOW_MAX_LOG_PARAMS",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No tracking variables from outside; the ones a job sets are undone after the test; wandb's
    settings, cache and staging dirs in tmp_path, not the home dir."""
    for name in TRACKING_VARS:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def preempted_then_finished(tmp_path, monkeypatch, report_to: list[str], between=lambda out: None):
    """pretrain stopped by a preemption at step 3 (exit 75), then the requeued start finishes it (6 steps)."""
    config = tiny_pretrain(tmp_path, report_to=report_to, run_name="tiny-run")
    with monkeypatch.context() as m:
        preempt_at(m, 3)
        assert main(["pretrain", "--config", str(config)]) == preempt.REQUEUE_EXIT
    between(tmp_path / "out")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued start: continues its own run
    assert main(["pretrain", "--config", str(config)]) == 0
    out = tmp_path / "out"
    return out, json.loads((out / "run.json").read_text())["tracking"]


@pytest.mark.slow
def test_mlflow_keeps_one_run_across_a_requeue(tmp_path, monkeypatch, clean_env):
    from mlflow.tracking import MlflowClient

    def while_queued(out):  # the preempted start left its run KILLED, not FINISHED
        ids = json.loads((out / "run.json").read_text())["tracking"]
        assert MlflowClient(ids["mlflow_tracking_uri"]).get_run(ids["mlflow_run_id"]).info.status == "KILLED"

    out, ids = preempted_then_finished(tmp_path, monkeypatch, ["mlflow"], while_queued)
    assert ids["mlflow_tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"  # the offline default, beside the run
    client = MlflowClient(ids["mlflow_tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert [r.info.run_id for r in runs] == [ids["mlflow_run_id"]]  # one run, continued by the requeued start
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # each step once: none lost, none logged twice
    assert "eval_loss" in run.data.metrics  # the evaluations after training belong to the run too
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert run.data.params == flat_params(resolved)  # the resolved config, not TrainingArguments
    assert run.data.params["training.learning_rate"] == "0.001"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "loss.png", "config.resolved.yaml", "metrics.json"} <= artifacts
    assert (out / "mlartifacts").is_dir()  # beside the store, not in the directory the job started in
    r = cli("sync", str(out))
    assert r.returncode == 0 and r.stdout.strip() == f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}"


def wandb_records(run_dir, kind: str) -> list[dict]:
    """The history or config records of one offline W&B run dir, as dicts. wandb 0.31 has no Python
    reader of its .wandb file any more (wandb-core writes it): a LevelDB-style log, a 7-byte header
    (":W&B", key, version), then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) of Record protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data, block, rows, pending = path.read_bytes(), 32 * 1024, [], b""
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, chunk = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if chunk in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == kind:
                items = record.history.item if kind == "history" else record.config.update
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


@pytest.mark.slow
def test_wandb_offline_keeps_one_run_id_across_a_requeue(tmp_path, monkeypatch, clean_env):
    out, ids = preempted_then_finished(tmp_path, monkeypatch, ["wandb"])
    starts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(d.name.endswith(f"-{ids['wandb_run_id']}") for d in starts)  # one id
    steps = [row["train/global_step"] for d in starts for row in wandb_records(d, "history") if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # across both starts: each step once, in order
    config = {k: v for row in wandb_records(starts[0], "config") for k, v in row.items()}
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert config["hpcnlp"] == json.loads(json.dumps(resolved))  # the resolved config, beside TrainingArguments
    assert (starts[-1] / "files" / "report.md").is_file()
    r = cli("sync", str(out))
    assert r.returncode == 0 and r.stdout.splitlines() == [f"wandb sync {starts[0]} {starts[1]}"]


def test_sync_prints_or_runs_the_commands_of_a_sweep(tmp_path, monkeypatch):
    """A sweep dir: each task's offline W&B dirs in start order, each MLflow store once."""
    from hpcnlp.cluster import sync

    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": [{}, {}]}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i in range(2):
        task = tmp_path / f"task-{i}"
        for name in ("offline-run-20261205_100000-abc", "offline-run-20261205_090000-abc"):
            (task / "wandb" / name).mkdir(parents=True)
        (task / "status.json").write_text("{}")
        (task / "run.json").write_text(json.dumps({"tracking": {"mlflow_tracking_uri": store}}))
    r = cli("sync", str(tmp_path))
    assert r.returncode == 0, r.stderr
    w = tmp_path / "task-{}" / "wandb" / "offline-run-20261205_{}-abc"
    assert r.stdout.splitlines() == [
        f"wandb sync {str(w).format(0, '090000')} {str(w).format(0, '100000')}",
        f"wandb sync {str(w).format(1, '090000')} {str(w).format(1, '100000')}",
        f"mlflow ui --backend-store-uri {store}",
    ]
    calls = []
    monkeypatch.setattr(sync.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done(0))
    assert cli("sync", "--run", str(tmp_path)).returncode == 0
    assert [c[:4] for c in calls] == [[sys.executable, "-m", "wandb", "sync"]] * 2
    monkeypatch.setattr(sync.subprocess, "run", lambda cmd, **kw: Done(1))
    assert cli("sync", "--run", str(tmp_path)).returncode == 1  # a failed upload is not hidden
    r = cli("sync", str(tmp_path / "task-0" / "wandb"))
    assert r.returncode == 2 and "no status.json there" in r.stderr  # not a run: one line, no traceback


class Done:
    def __init__(self, returncode: int):
        self.returncode = returncode


@pytest.mark.slow  # its fixtures train and export the sentiment teacher (shared with the bundle tests)
def test_validate_logs_the_bundle_into_the_mlflow_run_of_its_model(sentiment_teacher, sentiment_onnx, tmp_path):
    """A model trained with report_to: [mlflow] (its run.json names the run): validate adds the bundle's
    manifest and reports to that run, under validate/<name>/<version>, and tags the verdict."""
    import shutil

    from helpers import SENTIMENT_DATA, validate_config
    from mlflow.tracking import MlflowClient

    from hpcnlp.runtime import rundir

    model = tmp_path / "model"
    shutil.copytree(sentiment_teacher, model)  # the session's teacher stays as it is
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("hpcnlp", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    (model / "run.json").write_text("{}")
    rundir.record_tracking(model, mlflow_run_id=run_id, mlflow_tracking_uri=uri)
    data = {**SENTIMENT_DATA, "max_eval_samples": 64}
    assert main(["validate", "--config", str(validate_config(tmp_path, str(model), sentiment_onnx, data))]) == 0
    logged = {a.path for a in client.list_artifacts(run_id, "validate/test-model/1")}
    assert {f"validate/test-model/1/{n}" for n in ("manifest.json", "validation.md", "MODEL_CARD.md")} <= logged
    manifest = json.loads((tmp_path / "artifacts" / "test-model" / "1" / "manifest.json").read_text())
    local = client.download_artifacts(run_id, "validate/test-model/1/manifest.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == manifest
    assert client.get_run(run_id).data.tags["validate/test-model/1"] == "shipped"
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no run of its own
