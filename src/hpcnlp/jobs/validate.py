"""`hpcnlp validate`: the gate between an ONNX export and deployment teams.

The export's files are staged first; the *staged* copies are checked with onnxruntime against the
PyTorch model on real eval data (parity on N examples, the task metric on the whole eval set,
latency); then the bundle is completed (report, plot, model card, manifest) and renamed either to
<output_dir>/<name>/<version>/ (all thresholds met, exit 0) or to <rejected_dir>/<name>/<version>/
(exit 1). A rejected model never appears where shipped ones go.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from hpcnlp import bundle, card, checks
from hpcnlp.config import Problem, ValidateConfig, dump_config
from hpcnlp.data.labels import data_file_problems
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb, save_figure
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text, is_inside
from hpcnlp.spec import JobSpec, SlurmDefaults
from hpcnlp.tasks import (POSTPROCESS_TASKS, PRIMARY_METRIC, auto_model_class, batches, cpu, cpu_text,
                          evaluate, label_names, latency, load_data, model_task, task_of, torch_runner)

log = logging.getLogger(__name__)
PARITY_BATCH = 8


def check(cfg: ValidateConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    if not is_inside(cfg.onnx_dir, pending) and not (Path(cfg.onnx_dir) / "model.onnx").is_file():
        out.append(Problem(key="onnx_dir", message=f"no model.onnx in '{cfg.onnx_dir}'",
                           fix="run `hpcnlp export` first and point onnx_dir at its output_dir"))
    task = model_task(cfg.model_name_or_path)
    out += data_file_problems(task, cfg.data, pending) if task in POSTPROCESS_TASKS else []
    if cfg.bundle_dir.exists() and not cfg.overwrite:
        out.append(Problem(key="version", message=f"'{cfg.bundle_dir}' is already shipped",
                           fix="bump version (shipped bundles are immutable), or set overwrite: true"))
    if is_inside(cfg.rejected_dir, [cfg.output_dir]) or is_inside(cfg.output_dir, [cfg.rejected_dir]):
        out.append(Problem(key="rejected_dir", message=f"'{cfg.rejected_dir}' and output_dir '{cfg.output_dir}' "
                           "overlap: rejected bundles would sit among shipped ones", fix="give them separate dirs"))
    inputs = {"model_name_or_path": cfg.model_name_or_path, "onnx_dir": cfg.onnx_dir}
    out += checks.overlaps(cfg.output_dir, inputs) + checks.overlaps(cfg.rejected_dir, inputs, "rejected_dir")
    for key, path in (("version", cfg.bundle_dir), ("rejected_dir", Path(cfg.rejected_dir) / cfg.name / cfg.version)):
        if path.exists() and not (path / bundle.MANIFEST).is_file():  # a bundle is replaced, nothing else
            out.append(Problem(key=key, message=f"'{path}' exists and is not a bundle", fix="move it away first"))
    return out


# --- onnxruntime --------------------------------------------------------------------------------
def providers() -> list[str]:
    """CUDA where onnxruntime has it, else CPU."""
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=providers())


def ort_runner(session):
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))
    return run


# --- the checks ---------------------------------------------------------------------------------
def parity(reference, candidate, ds, pad_id: int, token_level: bool) -> dict:
    """Per output: max abs diff and argmax agreement; token-level outputs only at real (unpadded) tokens."""
    diffs, agree, total = {}, 0, 0
    for inputs, _ in batches(ds, PARITY_BATCH, pad_id):
        ref, got = reference(inputs), candidate(inputs)
        keep = inputs["attention_mask"].astype(bool) if token_level else np.ones(len(ref["logits"]), bool)
        for name, value in ref.items():
            d = np.abs(value - got[name])[keep]
            diffs[name] = max(diffs.get(name, 0.0), float(d.max()))
        agree += int((ref["logits"].argmax(-1) == got["logits"].argmax(-1))[keep].sum())
        total += int(keep.sum())
    return {"max_abs_diff": diffs, "argmax_agreement": agree / total, "compared": total}


def gate(results: dict, th, has_int8: bool, primary: str | None) -> list[dict]:
    """Every threshold as a row: check, measured, limit, passed."""
    fp32 = results["parity"]["onnx_fp32"]
    rows = [{"check": f"fp32 max abs diff ({name})", "measured": v, "limit": f"<= {th.fp32_atol:g}",
             "passed": v <= th.fp32_atol} for name, v in fp32["max_abs_diff"].items()]
    rows.append({"check": "fp32 argmax agreement", "measured": fp32["argmax_agreement"],
                 "limit": f">= {th.fp32_min_argmax_agreement:g}",
                 "passed": fp32["argmax_agreement"] >= th.fp32_min_argmax_agreement})
    if has_int8:
        int8 = results["parity"]["onnx_int8"]
        rows.append({"check": "int8 argmax agreement", "measured": int8["argmax_agreement"],
                     "limit": f">= {th.int8_min_argmax_agreement:g}",
                     "passed": int8["argmax_agreement"] >= th.int8_min_argmax_agreement})
        if primary:
            # Rounded: 0.7825 - 0.7725 is 0.010000000000000009 in floats, and 4 of 400 is 1 point, not more.
            drop = round(results["metrics"]["pytorch"][primary] - results["metrics"]["onnx_int8"][primary], 9)
            rows.append({"check": f"int8 {primary} drop vs PyTorch", "measured": drop,
                         "limit": f"<= {th.int8_max_metric_drop:g}", "passed": drop <= th.int8_max_metric_drop})
    return rows


# --- report -------------------------------------------------------------------------------------
def plot_latency(lat: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({int(b) for v in lat.values() for b in v})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), squeeze=False)
    for ax, b in zip(axes[0], sizes):
        variants = [v for v in lat if str(b) in lat[v]]
        p50 = [lat[v][str(b)]["p50_ms"] for v in variants]
        p95 = [lat[v][str(b)]["p95_ms"] for v in variants]
        ax.bar(variants, p50, label="p50")
        ax.scatter(variants, p95, color="black", marker="_", s=300, label="p95", zorder=3)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("ms per batch")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def run(cfg: ValidateConfig) -> int:
    import torch

    t0 = time.perf_counter()
    model_dir = resolve_model_path(cfg.model_name_or_path)
    task = task_of(model_dir)
    if task == "fill-mask":
        log.error("validate gates classifiers (sequence, token); for a masked LM use export's Optimum check")
        return status.EXIT_CONFIG
    names = label_names(model_dir)
    threads = cfg.latency.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    data = load_data(task, cfg.data, tokenizer, model_dir)  # every eval row checked before anything is staged
    eval_ds = data.splits["validation"]
    pad = tokenizer.pad_token_id
    token_level = task == "token-classification"

    staging = bundle.stage(Path(cfg.onnx_dir), Path(cfg.output_dir))
    try:
        has_int8 = (staging / "model.int8.onnx").is_file()
        model = auto_model_class(task).from_pretrained(model_dir).eval()
        runners = {"pytorch": torch_runner(model),
                   "onnx_fp32": ort_runner(ort_session(staging / "model.onnx", threads))}
        if has_int8:
            runners["onnx_int8"] = ort_runner(ort_session(staging / "model.int8.onnx", threads))
        sample = eval_ds.select(range(min(cfg.num_examples, len(eval_ds))))
        results = {"task": task, "eval_file": data.files["validation"], "eval_examples": len(eval_ds),
                   "parity_examples": len(sample), "threads": threads,
                   "providers": providers(),
                   "parity": {k: parity(runners["pytorch"], r, sample, pad, token_level)
                              for k, r in runners.items() if k != "pytorch"},
                   "metrics": {k: evaluate(r, eval_ds, task, names, pad) for k, r in runners.items()}}
        log.info("parity %s", {k: (v["max_abs_diff"], v["argmax_agreement"]) for k, v in results["parity"].items()})
        results["latency"] = {k: {str(b): latency(r, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes}
                              for k, r in runners.items()}
        results["cpu"] = cpu()
        if "test" in data.splits:  # held-out data, reported beside the validation file's; the gate stays on that
            results.update(test_file=data.files["test"], test_examples=len(data.splits["test"]),
                           test_metrics={k: evaluate(r, data.splits["test"], task, names, pad)
                                         for k, r in runners.items()})
        checks = gate(results, cfg.thresholds, has_int8, PRIMARY_METRIC.get(task))
        passed = all(c["passed"] for c in checks)
        results.update(checks=checks, passed=passed, wall_seconds=round(time.perf_counter() - t0, 2))
        write_reports(staging, cfg, task, names, results, passed)
        bundle.write_manifest(staging, {
            "name": cfg.name, "version": cfg.version, "task": task, "id2label": dict(enumerate(names)),
            "opset": _opset(staging / "model.onnx"), "source_model": {"path": model_dir,
                                                                       "sha256": bundle.dir_sha256(model_dir)},
            "thresholds": cfg.thresholds.model_dump(), "checks": checks, "passed": passed})
        if passed:
            final = bundle.publish(staging, cfg.bundle_dir, replace=cfg.overwrite)
            log.info("PASSED: shipped %s (hpcnlp verify %s)", final, final)
            return 0
        final = Path(cfg.rejected_dir) / cfg.name / cfg.version
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), final)
        for c in checks:
            if not c["passed"]:
                log.error("FAILED %s: %s (limit %s)", c["check"], c["measured"], c["limit"])
        log.error("REJECTED: nothing shipped; the artifact and its report are in %s", final)
        return status.EXIT_REJECTED
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed midway


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def write_reports(out: Path, cfg: ValidateConfig, task: str, names: list[str], results: dict, passed: bool) -> None:
    lat_rows = [{"model": k, "batch": int(b), **v, "threads": results["threads"]}
                for k, per in results["latency"].items() for b, v in per.items()]
    par_rows = [{"model": k, **{f"max abs diff {n}": d for n, d in v["max_abs_diff"].items()},
                 "argmax agreement": v["argmax_agreement"], "compared": v["compared"]}
                for k, v in results["parity"].items()]
    met_rows = [{"model": k, **v} for k, v in results["metrics"].items()]
    plot_latency(results["latency"], out / "latency.png", f"{cfg.name} {cfg.version}: latency at seq "
                 f"{cfg.latency.seq_length}, {results['threads']} thread(s)")
    body = [f"# Validation of {cfg.name} {cfg.version}: {'PASSED' if passed else 'FAILED'}", "",
            f"Reference: PyTorch `{cfg.model_name_or_path}`; ONNX from `{cfg.onnx_dir}`; onnxruntime providers "
            f"{results['providers']}.", "",
            "## Gate", "", markdown_table(results["checks"]), "",
            f"## Parity on {results['parity_examples']} eval examples", "", markdown_table(par_rows), "",
            f"## Task metrics on the whole eval set ({results['eval_examples']} examples of {results['eval_file']})",
            "", markdown_table(met_rows), "",
            *([f"## Task metrics on the held-out test set ({results['test_examples']} examples of "
               f"{results['test_file']}; not gated)", "",
               markdown_table([{"model": k, **v} for k, v in results["test_metrics"].items()]), ""]
              if "test_metrics" in results else []),
            f"## Latency (inputs padded to {cfg.latency.seq_length} tokens, {cfg.latency.repeats} runs)", "",
            f"CPU: {cpu_text(results['cpu'])}", "",
            markdown_table(lat_rows), "", "![latency](latency.png)", ""]
    atomic_write_text(out / "validation.md", "\n".join(body))
    atomic_write_json(out / "validation.json", results)
    atomic_write_text(out / "validate.resolved.yaml", dump_config(cfg))
    atomic_write_text(out / "MODEL_CARD.md", card.model_card(cfg, out, task, names, results, passed))


def _bundle(cfg: ValidateConfig) -> Path:
    """Where the last run put its bundle: shipped, else rejected."""
    return cfg.bundle_dir if cfg.bundle_dir.is_dir() else Path(cfg.rejected_dir) / cfg.name / cfg.version


def is_complete(cfg: ValidateConfig) -> bool:
    """Shipped: the bundle's manifest is in place (a rejected model is not a finished stage)."""
    return (cfg.bundle_dir / bundle.MANIFEST).is_file()


def summary_row(cfg: ValidateConfig) -> dict:
    path = _bundle(cfg)
    if not (path / "validation.json").is_file():
        return {}
    v = json.loads((path / "validation.json").read_text())
    metric = PRIMARY_METRIC.get(v["task"], "f1")
    runtimes = [k for k in ("pytorch", "onnx_fp32", "onnx_int8") if k in v["metrics"]]
    return {"metric": ("PASSED: " if v["passed"] else "REJECTED: ")
            + ", ".join(f"{k} {v['metrics'][k][metric]:.3f}" for k in runtimes),
            "size": mb(path / "model.onnx", path / "model.int8.onnx"),
            "latency b1 p50": ", ".join(f"{k} {v['latency'][k]['1']['p50_ms']:.1f} ms" for k in runtimes
                                        if "1" in v["latency"].get(k, {})),
            "output": str(path)}


SPEC = JobSpec(name="validate", help="gate ONNX vs PyTorch (parity, metric, latency); ship or reject a bundle",
               config=ValidateConfig, check=check, run=run, single_process=True, is_complete=is_complete,
               summary_row=summary_row,
               status_file=lambda cfg: Path(cfg.output_dir) / cfg.name / f".{cfg.version}.status.json",
               slurm=SlurmDefaults(time="00:30:00", cpus_per_task=4,
                                   note="latency is measured on these CPUs: ask for the deployment CPU count"))
