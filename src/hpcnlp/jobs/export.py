"""`hpcnlp export`: a saved model dir -> ONNX (Optimum), optionally graph-optimized and int8-quantized.

output_dir: model.onnx, model.int8.onnx (when quantized), config.json (id2label), tokenizer files,
metrics.json, report.md. Built under a temporary name and renamed into place at the end: a refused
export leaves nothing behind. Shipping is `hpcnlp validate`'s call, not this job's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

from hpcnlp import checks, tasks
from hpcnlp.config import FinetuneDataConfig, JobConfig, Problem, Section, dump_config
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb, write_report
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_dir, atomic_write_text
from hpcnlp.ship.onnx import external_data_files
from hpcnlp.ship.quantize import Quantizer, Recipe, calibration_set
from hpcnlp.spec import JobSpec, SlurmDefaults
from hpcnlp.tasks import load_data, model_task, task_of

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class QuantizeConfig(Section):
    """int8 quantization with onnxruntime (through Optimum's ORTQuantizer)."""

    mode: Literal["none", "dynamic", "static"] = "dynamic"
    preset: Literal["avx2", "avx512_vnni", "arm64"] = "avx2"  # the CPU the bundle will run on
    per_channel: bool = False
    calibration_samples: int = Field(128, ge=1)  # static: rows of data.train_file, shuffled by data.seed


class ExportConfig(JobConfig):
    """ONNX export with Optimum, optional ORT graph optimization and int8 quantization."""

    job: Literal["export"] = "export"
    model_name_or_path: str  # a fine-tuned (or distilled, or pretrained MLM) model dir
    trust_remote_code: bool = False
    opset: int = Field(17, ge=11, le=21)
    atol: float | None = Field(None, gt=0)  # Optimum's export check; None: its default for the architecture
    allow_tolerance_failure: bool = False  # Optimum only warns when atol is missed; we refuse unless this
    optimization_level: int = Field(0, ge=0, le=3)  # ORT graph optimization O1..O3 (0: none)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    data: FinetuneDataConfig | None = None  # static quantization calibrates on data.train_file

    def problems(self) -> list[Problem]:
        if self.quantize.mode == "static" and self.data is None:
            return [
                Problem(
                    key="data",
                    message="static quantization needs calibration data",
                    fix="add data.train_file (the training data), or use quantize.mode: dynamic",
                )
            ]
        return []


def check(cfg: ExportConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.output_dir(cfg) + checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    out += checks.overlaps(
        cfg.output_dir, {"model_name_or_path": cfg.model_name_or_path, **(cfg.data.files() if cfg.data else {})}
    )
    if cfg.quantize.mode == "static" and cfg.data is not None:
        task = model_task(cfg.model_name_or_path)
        if task and not tasks.labelled(task):
            out.append(
                Problem(
                    key="quantize.mode",
                    message=f"static quantization calibrates on labelled data; a {task} model has none",
                    fix="use quantize.mode: dynamic",
                )
            )
        out += tasks.data_problems(task, cfg.data, pending) if tasks.labelled(task) else []
    return out


class ToleranceWarnings(logging.Handler):
    """Optimum logs (does not raise) when the exported model misses atol; collect those messages."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "succeeded with the warning" in msg:
            self.messages.append(msg.split("\n The exported model")[0])


def export_onnx(model_dir: str, out: Path, task: str, cfg: ExportConfig) -> list[str]:
    """Optimum's exporter (dynamic batch and sequence axes); returns its tolerance failures."""
    from optimum.exporters.onnx import main_export

    warnings = ToleranceWarnings()
    optimum_log = logging.getLogger("optimum.exporters.onnx.convert")
    optimum_log.addHandler(warnings)
    try:
        main_export(
            model_dir,
            output=out,
            task=tasks.get(task).optimum_task,
            opset=cfg.opset,
            atol=cfg.atol,
            do_validation=True,
            trust_remote_code=cfg.trust_remote_code,
            library_name="transformers",
        )
    finally:
        optimum_log.removeHandler(warnings)
    return warnings.messages


def optimize(out: Path, level: int) -> None:
    """ORT graph optimization O1..O3 (as in Optimum); the optimized graph replaces model.onnx."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    optimizer = ORTOptimizer.from_pretrained(out, file_names=["model.onnx"])
    optimizer.optimize(AutoOptimizationConfig.with_optimization_level(f"O{level}"), save_dir=out)
    os.replace(out / "model_optimized.onnx", out / "model.onnx")


def quantize(out: Path, cfg: ExportConfig, task: str, model_dir: str, tokenizer) -> dict:
    """int8 with ORTQuantizer: dynamic (ranges at run time) or static (ranges from calibration data)."""
    q = cfg.quantize
    recipe = Recipe(static=q.mode == "static", per_channel=q.per_channel)

    def calibration():
        train = load_data(task, cfg.data, tokenizer, model_dir).splits["train"]
        return calibration_set(
            train, q.calibration_samples, cfg.data.seed, tokenizer.pad_token_id, cfg.data.max_seq_length
        )

    quantizer = Quantizer(out / "model.onnx", q.preset, calibration if recipe.static else None)
    quantizer(recipe, out / "model.int8.onnx")
    return {
        "mode": q.mode,
        "preset": q.preset,
        "per_channel": q.per_channel,
        "calibration_samples": quantizer.calibration_rows,
        "recipe": recipe.name,
    }


class Refused(Exception):
    """The export must not be used; atomic_dir then removes everything it wrote."""


def run(cfg: ExportConfig) -> int:
    try:
        return build(cfg)
    except Refused as e:
        log.error("refused: %s; nothing written to %s", e, cfg.output_dir)
        return status.EXIT_REJECTED


def build(cfg: ExportConfig) -> int:
    t0 = time.perf_counter()
    model_dir = resolve_model_path(cfg.model_name_or_path)
    task = task_of(model_dir)
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    log.info("exporting %s (%s) to ONNX opset %d", model_dir, task, cfg.opset)
    with atomic_dir(cfg.output_dir, replace=True) as out:
        failures = export_onnx(model_dir, out, task, cfg)
        if failures and not cfg.allow_tolerance_failure:
            for msg in failures:
                log.error("%s", msg)
            raise Refused(
                "the ONNX outputs differ from PyTorch beyond Optimum's atol (above). Fix: look for "
                "ops that export badly, or set allow_tolerance_failure: true (validate still gates)"
            )
        # int8 from the plain graph: ORT's quantizer cannot type the fused contrib ops of an O2/O3 graph,
        # and onnxruntime fuses the int8 graph itself when a session loads it.
        quant = quantize(out, cfg, task, model_dir, tokenizer) if cfg.quantize.mode != "none" else None
        if cfg.optimization_level:
            optimize(out, cfg.optimization_level)
        # with their external data files (a model over 2 GB: model.onnx_data), which stay beside them
        models = sorted(out.glob("*.onnx"))
        data = [out / d for f in models for d in external_data_files(f)]
        sizes = {f.name: f.stat().st_size for f in [*models, *data]}
        metrics = {
            "job": "export",
            "task": task,
            "source_model": model_dir,
            "opset": cfg.opset,
            "optimization_level": cfg.optimization_level,
            "optimum_tolerance_failures": failures,
            "quantization": quant,
            "sizes_bytes": sizes,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_text(out / "config.resolved.yaml", dump_config(cfg))
        rows = [{"file": k, "MB": round(v / 2**20, 2)} for k, v in sizes.items()]
        write_report(
            out,
            f"ONNX export: {Path(model_dir).name}",
            metrics,
            [
                ("Files", markdown_table(rows)),
                (
                    "Export",
                    f"task {task}, opset {cfg.opset}, dynamic batch and sequence axes; Optimum's atol check: "
                    f"{'passed' if not failures else 'FAILED (allowed by config)'}; ORT optimization "
                    f"O{cfg.optimization_level}; quantization: {quant or 'none'}",
                ),
            ],
        )
    log.info("ONNX model(s) %s in %s; next: hpcnlp validate", list(sizes), cfg.output_dir)
    return 0


def summary_row(cfg: ExportConfig) -> dict:
    out = Path(cfg.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    int8 = (out / "model.int8.onnx").is_file()
    return {
        "metric": f"opset {m['opset']}, Optimum check "
        + ("passed" if not m["optimum_tolerance_failures"] else "FAILED"),
        "size": mb(out / "model.onnx", out / "model.int8.onnx") + (" (fp32 / int8)" if int8 else ""),
    }


SPEC = JobSpec(
    name="export",
    order=60,
    help="export a model to ONNX with Optimum; optional ORT optimization, int8",
    config=ExportConfig,
    check=check,
    run=run,
    single_process=True,
    summary_row=summary_row,
    slurm=SlurmDefaults(time="00:30:00", cpus_per_task=4),
)
