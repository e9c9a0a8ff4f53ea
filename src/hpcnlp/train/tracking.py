"""MLflow and Weights & Biases (`training.report_to: [mlflow, wandb]`) through the HF Trainer's own callbacks,
one tracking run per hpcnlp run, offline by default (docs/tracking.md).

- Those callbacks are configured by their environment variables, set here before the Trainer is built,
  from `tracking:` (config), then the job's environment (e.g. the cluster profile's `env:`), then defaults:
  MLflow: MLFLOW_TRACKING_URI (default sqlite:///<output_dir>/mlflow.db), MLFLOW_EXPERIMENT_NAME.
  W&B: WANDB_MODE (default offline: `hpcnlp sync` uploads from the login node), WANDB_DIR=<output_dir>,
  WANDB_PROJECT.
- One tracking run across requeues: its ids are kept in run.json (rundir.record_tracking) and a continued
  start passes them back (MLFLOW_RUN_ID; WANDB_RUN_ID + WANDB_RESUME=allow). The runs end when the job ends
  (`close`), not when train() returns: the evaluations after training log into them too.
- params: the resolved config; metrics: what the Trainer logs, at its global step; artifacts: report.md,
  the plots, config.resolved.yaml (`log_files`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers.integrations import MLflowCallback, WandbCallback

from hpcnlp.config import TrainingJobConfig
from hpcnlp.runtime import rundir

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "hpcnlp"
MLFLOW_DB = "mlflow.db"


def reporters(cfg: TrainingJobConfig) -> set[str]:
    value = cfg.training.report_to
    names = {value} if isinstance(value, str) else set(value or ())
    if "all" in names:  # the Trainer's "all": whatever is installed
        from transformers.integrations import get_available_reporting_integrations

        names |= set(get_available_reporting_integrations())
    return names & {"mlflow", "wandb"}


def mlflow_uri(cfg: TrainingJobConfig) -> str:
    default = f"sqlite:///{Path(cfg.output_dir).absolute() / MLFLOW_DB}"
    return cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (as in overrides), values as text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class RunMLflowCallback(MLflowCallback):
    """HF's MLflow callback, its run kept open until the job ends, the resolved config as its params,
    and its run id recorded in run.json for the next start."""

    def __init__(self, cfg: TrainingJobConfig, continued: bool):
        super().__init__()
        self.cfg, self.continued = cfg, continued

    def setup(self, args, state, model):
        super().setup(args, state, model)
        if not state.is_world_process_zero:
            return
        run_id = self._ml_flow.active_run().info.run_id
        if not self.continued:  # a continued run has its params: MLflow refuses to change one (max_steps may)
            limit = self._MAX_PARAM_VAL_LENGTH
            params = {k: v[:limit] for k, v in flat_params(self.cfg.model_dump(mode="json")).items()}
            self._ml_flow.log_params(params)
            uri = self._ml_flow.get_tracking_uri()
            rundir.record_tracking(self.cfg.output_dir, mlflow_run_id=run_id, mlflow_tracking_uri=uri)
        log.info("mlflow: run %s in %s", run_id, self._ml_flow.get_tracking_uri())

    def on_train_end(self, args, state, control, **kwargs):
        pass  # the run ends with the job (Tracking.close): evaluations after training belong to it too


class RunWandbCallback(WandbCallback):
    """HF's W&B callback, with the resolved config beside the TrainingArguments it logs."""

    def __init__(self, cfg: TrainingJobConfig):
        super().__init__()
        self.cfg = cfg

    def setup(self, args, state, model, **kwargs):
        super().setup(args, state, model, **kwargs)
        if state.is_world_process_zero:
            self._wandb.config.update({"hpcnlp": self.cfg.model_dump(mode="json")}, allow_val_change=True)


class Tracking:
    """The tracking of one run (rank 0 logs; every rank gets the same environment)."""

    def __init__(self, cfg: TrainingJobConfig, is_main: bool):
        self.cfg, self.is_main, self.names = cfg, is_main, reporters(cfg)
        ids = rundir.tracking_ids(cfg.output_dir)  # run.json as claim() left it: ids only of this same run
        if "mlflow" in self.names:
            self._mlflow_env(ids.get("mlflow_run_id"))
        if "wandb" in self.names:
            self._wandb_env(ids.get("wandb_run_id"))

    def _mlflow_env(self, run_id: str | None) -> None:
        import mlflow

        t, uri = self.cfg.tracking, mlflow_uri(self.cfg)
        experiment = t.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        os.environ.update(
            MLFLOW_TRACKING_URI=uri,
            MLFLOW_EXPERIMENT_NAME=experiment,
            MLFLOW_MAX_LOG_PARAMS="0",  # not HF's TrainingArguments dump: the resolved config (RunMLflowCallback)
        )
        self.mlflow_continued = run_id is not None
        if run_id:
            os.environ["MLFLOW_RUN_ID"] = run_id
        else:
            os.environ.pop("MLFLOW_RUN_ID", None)
        if not self.is_main:
            return
        mlflow.set_tracking_uri(uri)  # not only the variable: mlflow keeps a URI set earlier in this process
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
            # Artifacts beside the database, not in ./mlartifacts of whatever dir the job started in.
            root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            mlflow.create_experiment(experiment, artifact_location=root.as_uri())

    def _wandb_env(self, run_id: str | None) -> None:
        from wandb.sdk.lib.runid import generate_id

        t = self.cfg.tracking
        run_id = run_id or generate_id()
        os.environ.update(
            WANDB_MODE=t.wandb_mode or os.environ.get("WANDB_MODE") or "offline",
            WANDB_DIR=str(Path(self.cfg.output_dir).absolute()),
            WANDB_PROJECT=t.experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT,
            WANDB_RUN_ID=run_id,
            WANDB_RESUME="allow",
        )
        if self.is_main:
            rundir.record_tracking(self.cfg.output_dir, wandb_run_id=run_id)

    def attach(self, trainer) -> None:
        """Swap the Trainer's own MLflow / W&B callbacks (from report_to) for the ones above."""
        if "mlflow" in self.names:
            trainer.remove_callback(MLflowCallback)
            trainer.add_callback(RunMLflowCallback(self.cfg, self.mlflow_continued))
        if "wandb" in self.names:
            trainer.remove_callback(WandbCallback)
            trainer.add_callback(RunWandbCallback(self.cfg))

    def log_files(self, files: list[Path]) -> None:
        """report.md, plots, the resolved config into the runs (rank 0, once the job has written them)."""
        files = [f for f in files if f.is_file()]
        if "mlflow" in self.names and self.is_main:
            import mlflow

            if mlflow.active_run() is not None:
                for f in files:
                    mlflow.log_artifact(str(f))
        if "wandb" in self.names and self.is_main:
            import wandb

            if wandb.run is not None:
                for f in files:
                    wandb.save(str(f), base_path=str(f.parent), policy="now")

    def close(self, status: str = "FINISHED") -> None:
        """End the runs this process logged into. MLflow status: FINISHED; KILLED when checkpointed for a
        requeue (the requeued start sets it RUNNING again); FAILED when training raised."""
        if "mlflow" in self.names:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status)
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if status == "FAILED" else 0)


def log_to_model_run(model_dir: str | Path, bundle_dir: Path, verdict: str) -> None:
    """validate: the bundle's manifest and reports into the MLflow run that trained its model (the model
    dir's run.json), so that run shows what shipped or was rejected. No such run, or no mlflow here: nothing.
    A store that cannot be reached costs a warning, never the bundle."""
    import importlib.util

    ids = rundir.tracking_ids(model_dir)
    if not ids.get("mlflow_run_id") or importlib.util.find_spec("mlflow") is None:
        return
    from mlflow.tracking import MlflowClient

    where = f"validate/{bundle_dir.parent.name}/{bundle_dir.name}"  # validate/<name>/<version>
    try:
        client = MlflowClient(ids["mlflow_tracking_uri"])
        for name in ("manifest.json", "validation.md", "validation.json", "latency.png", "MODEL_CARD.md"):
            if (bundle_dir / name).is_file():
                client.log_artifact(ids["mlflow_run_id"], str(bundle_dir / name), where)
        client.set_tag(ids["mlflow_run_id"], where, verdict)
        log.info("mlflow: %s logged into run %s", where, ids["mlflow_run_id"])
    except Exception as e:  # the bundle is final already; tracking is a view of it
        log.warning("mlflow: could not log %s into run %s: %s", where, ids["mlflow_run_id"], e)
