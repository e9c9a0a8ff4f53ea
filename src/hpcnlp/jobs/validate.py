"""`hpcnlp validate`: the gate between an ONNX export and deployment teams.

The export's files are staged first; the *staged* copies are checked with onnxruntime against the
PyTorch model on real eval data (parity on N examples, the task metric on the whole eval set,
latency, edge-case inputs); an int8 model that misses the gate sends validate through other int8
recipes (hpcnlp.ship.int8_search), the first that passes ships, none: fp32 ships alone or the run is
rejected (thresholds.int8_fallback). Then the bundle is completed (report, plot, model card, manifest) and
renamed either to <output_dir>/<name>/<version>/ (all thresholds met, exit 0) or to
<rejected_dir>/<name>/<version>/ (exit 3). A rejected model never appears where shipped ones go.

This module is the job: its config, its checks, and `run`'s sequence; the work is hpcnlp.ship's (measure,
int8_search, gate, report, bundle).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from hpcnlp import checks, tasks
from hpcnlp.config import ConfigError, FinetuneDataConfig, JobConfig, LatencyConfig, Problem, Section
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.report import mb
from hpcnlp.runtime import status
from hpcnlp.runtime.io import is_inside
from hpcnlp.ship import bundle
from hpcnlp.ship.gate import gate
from hpcnlp.ship.int8_search import choose_int8
from hpcnlp.ship.measure import measure, reference
from hpcnlp.ship.onnx import opset
from hpcnlp.ship.report import write_reports
from hpcnlp.spec import JobSpec, SlurmDefaults
from hpcnlp.tasks import load_data, model_task, task_of

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class ValidationThresholds(Section):
    fp32_atol: float = Field(1e-4, gt=0)  # max abs diff of every output, ONNX fp32 vs PyTorch
    fp32_min_argmax_agreement: float = Field(1.0, ge=0, le=1)
    int8_max_metric_drop: float = Field(0.01, ge=0)  # absolute: 0.01 = 1 point of accuracy / F1
    # int8 vs PyTorch predictions on the whole eval set (token tasks: per token). The metric drop alone
    # lets flips cancel out: the test suite's sentiment teacher (MiniLM, 0.70 accuracy, many borderline
    # examples) flips 5.75% of 400 eval answers with dynamic int8 and still gains 1.25 points of accuracy;
    # it is a different model all the same. 0.97: room for the few borderline examples that int8 noise
    # flips (per-channel weights: 2.75% there), none for a recipe that changes 1 answer in 20.
    int8_min_argmax_agreement: float = Field(0.97, ge=0, le=1)
    # When no int8 recipe passes: ship fp32 alone (no model.int8.onnx, the reason in validation.json/md),
    # or reject the run.
    int8_fallback: Literal["fp32", "reject"] = "fp32"


class Int8SearchConfig(Section):
    """When the export's int8 misses the gate, validate tries other recipes (hpcnlp.ship.int8_search) in this budget."""

    # recipes made by the search: per-channel, static QDQ, then its 1..max_sensitive_nodes most sensitive
    # MatMuls blockwise 8-bit (fp32 where the weight is not a constant); 0: only the export's int8 is judged
    max_attempts: int = Field(6, ge=0)
    max_seconds: float = Field(900, gt=0)  # search wall time, checked before each attempt (Slurm default: 30 min)
    max_sensitive_nodes: int = Field(4, ge=0)  # most sensitive MatMuls given more precision, at most
    calibration_samples: int = Field(128, ge=1)  # static QDQ: rows of data.train_file, shuffled by data.seed


class ValidateConfig(JobConfig):
    """The gate: ONNX vs PyTorch on real eval data; a passing model ships to <output_dir>/<name>/<version>/."""

    job: Literal["validate"] = "validate"
    output_dir: str = "artifacts"  # shipped bundles: <output_dir>/<name>/<version>/
    rejected_dir: str = "rejected"  # failing ones, with their report: <rejected_dir>/<name>/<version>/
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_name_or_path: str  # the PyTorch model that was exported (the reference)
    onnx_dir: str  # `hpcnlp export` output_dir: model.onnx (+ model.int8.onnx)
    data: FinetuneDataConfig  # eval set: validation_file (else finetune's split of train_file)
    num_examples: int = Field(64, ge=1)  # N eval examples for the per-output parity checks
    thresholds: ValidationThresholds = Field(default_factory=ValidationThresholds)
    int8_search: Int8SearchConfig = Field(default_factory=Int8SearchConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    license: str = "other"  # the model card's, where the base model's own card states none
    language: str = "en"  # of the text the model reads (the model card's front matter)

    @property
    def bundle_dir(self) -> Path:
        return Path(self.output_dir) / self.name / self.version

    @property
    def rejected_bundle_dir(self) -> Path:
        return Path(self.rejected_dir) / self.name / self.version


def check(cfg: ValidateConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    if not is_inside(cfg.onnx_dir, pending) and not (Path(cfg.onnx_dir) / "model.onnx").is_file():
        out.append(
            Problem(
                key="onnx_dir",
                message=f"no model.onnx in '{cfg.onnx_dir}'",
                fix="run `hpcnlp export` first and point onnx_dir at its output_dir",
            )
        )
    elif not is_inside(cfg.onnx_dir, pending):
        out += external_data_problems(Path(cfg.onnx_dir))
    task = model_task(cfg.model_name_or_path)
    out += tasks.data_problems(task, cfg.data, pending) if tasks.labelled(task) else []
    if cfg.bundle_dir.exists() and not cfg.overwrite:
        out.append(
            Problem(
                key="version",
                message=f"'{cfg.bundle_dir}' is already shipped",
                fix="bump version (shipped bundles are immutable), or set overwrite: true",
            )
        )
    if is_inside(cfg.rejected_dir, [cfg.output_dir]) or is_inside(cfg.output_dir, [cfg.rejected_dir]):
        out.append(
            Problem(
                key="rejected_dir",
                message=f"'{cfg.rejected_dir}' and output_dir '{cfg.output_dir}' "
                "overlap: rejected bundles would sit among shipped ones",
                fix="give them separate dirs",
            )
        )
    inputs = {"model_name_or_path": cfg.model_name_or_path, "onnx_dir": cfg.onnx_dir}
    out += checks.overlaps(cfg.output_dir, inputs) + checks.overlaps(cfg.rejected_dir, inputs, "rejected_dir")
    for key, path in (("version", cfg.bundle_dir), ("rejected_dir", cfg.rejected_bundle_dir)):
        if path.exists() and not (path / bundle.MANIFEST).is_file():  # a bundle is replaced, nothing else
            out.append(Problem(key=key, message=f"'{path}' exists and is not a bundle", fix="move it away first"))
    return out


def external_data_problems(onnx_dir: Path) -> list[Problem]:
    """A model over 2 GB keeps its weights in files beside it: each must be there, by a plain name (the
    bundle is one flat dir, and staging copies them with the model)."""
    try:
        names = bundle.model_data_files(onnx_dir)
    except Exception:  # noqa: BLE001 - not a readable ONNX file: the job's own load says so, in its words
        return []
    return [
        Problem(
            key="onnx_dir",
            message=f"'{onnx_dir}': a model's external data '{name}' is not a file beside it",
            fix="export again (hpcnlp export) and keep the data file next to model.onnx",
        )
        for name in names
        if Path(name).name != name or not (onnx_dir / name).is_file()
    ]


# --- the job: measure -> judge -> publish | reject -----------------------------------------------
def run(cfg: ValidateConfig) -> int:
    import torch

    from hpcnlp.train.tracking import log_to_model_run

    t0 = time.perf_counter()
    model_dir = resolve_model_path(cfg.model_name_or_path)
    task = task_of(model_dir)
    if not tasks.labelled(task):
        log.error("validate gates classifiers (sequence, token); for a masked LM use export's Optimum check")
        return status.EXIT_CONFIG
    tokenizer = load_tokenizer(model_dir)
    data = load_data(task, cfg.data, tokenizer, model_dir)  # every eval row checked before anything is staged
    threads, before = cfg.latency.num_threads or torch.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)  # the latency is measured on these; set back at the end (an in-process caller)

    staging = bundle.stage(Path(cfg.onnx_dir), Path(cfg.output_dir))
    try:
        ref = reference(cfg, model_dir, task, tokenizer, data.splits["validation"])  # PyTorch: what ONNX must match
        int8 = choose_int8(cfg, staging, ref, data.splits["train"], threads)  # the export's, or a recipe that passes
        results = measure(cfg, staging, ref, data, int8, threads)
        checks = gate(results, cfg.thresholds, tasks.get(task).primary_metric)
        passed = all(c["passed"] for c in checks)
        results.update(checks=checks, passed=passed, wall_seconds=round(time.perf_counter() - t0, 2))
        write_reports(staging, cfg, task, ref.names, results, passed)
        bundle.write_manifest(staging, manifest(cfg, staging, model_dir, ref.names, results))
        code = publish(staging, cfg) if passed else reject(staging, cfg, checks)
        final = cfg.bundle_dir if passed else cfg.rejected_bundle_dir
        log_to_model_run(model_dir, final, "shipped" if passed else "rejected")
        return code
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed midway
        torch.set_num_threads(before)


def manifest(cfg: ValidateConfig, staging: Path, model_dir: str, names: list[str], results: dict) -> dict:
    """validate's entries of the bundle's manifest.json (bundle.write_manifest adds files and provenance)."""
    int8 = results.get("int8")
    return {
        "name": cfg.name,
        "version": cfg.version,
        "task": results["task"],
        "id2label": dict(enumerate(names)),
        "opset": opset(staging / "model.onnx"),
        "source_model": {"path": model_dir, "sha256": bundle.dir_sha256(model_dir)},
        "thresholds": cfg.thresholds.model_dump(),
        "checks": results["checks"],
        "passed": results["passed"],
        "int8": {
            k: int8[k]
            for k in ("recipe", "split_nodes", "blockwise_nodes", "fp32_nodes", "latency_b1_p50_ms", "reason")
        }
        if int8
        else None,
    }


def publish(staging: Path, cfg: ValidateConfig) -> int:
    try:
        final = bundle.publish(staging, cfg.bundle_dir, replace=cfg.overwrite)
    except FileExistsError:  # another validate of this version shipped while this one measured
        problem = Problem(
            key="version",
            message=f"'{cfg.bundle_dir}' was shipped by another run while this one ran; "
            "this run shipped nothing and left that bundle as it is",
            fix="bump version to ship this run's model",
        )
        raise ConfigError(cfg._source, [problem]) from None
    log.info("PASSED: shipped %s (hpcnlp verify %s)", final, final)
    return 0


def reject(staging: Path, cfg: ValidateConfig, checks: list[dict]) -> int:
    final = bundle.reject(staging, cfg.rejected_bundle_dir)
    for c in checks:
        if not c["passed"]:
            log.error("FAILED %s: %s (limit %s)", c["check"], c["measured"], c["limit"])
    log.error("REJECTED: nothing shipped; the artifact and its report are in %s", final)
    return status.EXIT_REJECTED


# --- the registry's view: finished?, the summary row ----------------------------------------------
def _bundle(cfg: ValidateConfig) -> Path:
    """Where the last run put its bundle: shipped, else rejected."""
    return cfg.bundle_dir if cfg.bundle_dir.is_dir() else cfg.rejected_bundle_dir


def is_complete(cfg: ValidateConfig) -> bool:
    """Shipped: the bundle's manifest is in place (a rejected model is not a finished stage)."""
    return (cfg.bundle_dir / bundle.MANIFEST).is_file()


def summary_row(cfg: ValidateConfig) -> dict:
    path = _bundle(cfg)
    if not (path / "validation.json").is_file():
        return {}
    v = json.loads((path / "validation.json").read_text())
    metric = tasks.get(v["task"]).primary_metric
    runtimes = [k for k in ("pytorch", "onnx_fp32", "onnx_int8") if k in v["metrics"]]
    return {
        "metric": ("PASSED: " if v["passed"] else "REJECTED: ")
        + ", ".join(f"{k} {v['metrics'][k][metric]:.3f}" for k in runtimes),
        "size": mb(path / "model.onnx", path / "model.int8.onnx"),
        "latency b1 p50": ", ".join(
            f"{k} {v['latency'][k]['1']['p50_ms']:.1f} ms" for k in runtimes if "1" in v["latency"].get(k, {})
        ),
        "output": str(path),
    }


SPEC = JobSpec(
    name="validate",
    order=70,
    help="gate ONNX vs PyTorch (parity, metric, latency); ship or reject a bundle",
    config=ValidateConfig,
    check=check,
    run=run,
    single_process=True,
    is_complete=is_complete,
    summary_row=summary_row,
    status_file=lambda cfg: Path(cfg.output_dir) / cfg.name / f".{cfg.version}.status.json",
    slurm=SlurmDefaults(
        time="00:30:00", cpus_per_task=4, note="latency is measured on these CPUs: ask for the deployment CPU count"
    ),
)
