"""`hpcnlp validate`: the gate between an ONNX export and deployment teams.

The export's files are staged first; the *staged* copies are checked with onnxruntime against the
PyTorch model on real eval data (parity on N examples, the task metric on the whole eval set,
latency, edge-case inputs); an int8 model that misses the gate sends validate through other int8
recipes (hpcnlp.quantize), the first that passes ships, none: fp32 ships alone or the run is rejected
(thresholds.int8_fallback). Then the bundle is completed (report, plot, model card, manifest) and
renamed either to <output_dir>/<name>/<version>/ (all thresholds met, exit 0) or to
<rejected_dir>/<name>/<version>/ (exit 3). A rejected model never appears where shipped ones go.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from pydantic import Field

from hpcnlp import bundle, card, checks
from hpcnlp.config import dump_config, FinetuneDataConfig, JobConfig, LatencyConfig, Problem, Section
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.quantize import Quantizer, Recipe, calibration_set, search
from hpcnlp.report import markdown_table, mb, save_figure
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text, is_inside
from hpcnlp.spec import JobSpec, SlurmDefaults
from hpcnlp import tasks
from hpcnlp.tasks import (METRIC_BATCH, MODEL_INPUTS, auto_model_class, batches,
                          cpu, cpu_text, label_names, latency, load_data, metrics, model_task, task_of, torch_runner)

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
    """When the export's int8 misses the gate, validate tries other recipes (hpcnlp.quantize) in this budget."""

    # recipes made by the search: per-channel, static QDQ, then 1..max_fp32_nodes MatMuls in fp32 (0: only
    # the export's int8 is judged)
    max_attempts: int = Field(6, ge=0)
    max_seconds: float = Field(900, gt=0)  # search wall time, checked before each attempt (Slurm default: 30 min)
    max_fp32_nodes: int = Field(4, ge=0)  # most sensitive MatMuls kept in fp32, at most
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
PARITY_BATCH = 8


def check(cfg: ValidateConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    if not is_inside(cfg.onnx_dir, pending) and not (Path(cfg.onnx_dir) / "model.onnx").is_file():
        out.append(Problem(key="onnx_dir", message=f"no model.onnx in '{cfg.onnx_dir}'",
                           fix="run `hpcnlp export` first and point onnx_dir at its output_dir"))
    task = model_task(cfg.model_name_or_path)
    out += tasks.data_problems(task, cfg.data, pending) if tasks.labelled(task) else []
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


def metric_drop(reference: dict, got: dict, primary: str) -> float:
    # Rounded: 0.7825 - 0.7725 is 0.010000000000000009 in floats, and 4 of 400 is 1 point, not more.
    return round(reference[primary] - got[primary], 9)


def int8_checks(m: dict, th, primary: str | None) -> list[dict]:
    """The int8 rows of the gate for one recipe's measurements; the recipe search judges with the same rows.
    Agreement on the whole eval set, not the parity sample: at 0.97, one flip in 32 would already fail."""
    rows = [{"check": "int8 argmax agreement (eval set)", "measured": m["argmax_agreement"],
             "limit": f">= {th.int8_min_argmax_agreement:g}",
             "passed": m["argmax_agreement"] >= th.int8_min_argmax_agreement},
            {"check": "int8 argmax agreement (edge cases)", "measured": m["edge_argmax_agreement"],
             "limit": f">= {th.int8_min_argmax_agreement:g}",
             "passed": m["edge_argmax_agreement"] >= th.int8_min_argmax_agreement}]
    if primary:
        rows.append({"check": f"int8 {primary} drop vs PyTorch", "measured": m["metric_drop"],
                     "limit": f"<= {th.int8_max_metric_drop:g}", "passed": m["metric_drop"] <= th.int8_max_metric_drop})
    return rows


def gate(results: dict, th, primary: str | None) -> list[dict]:
    """Every threshold as a row: check, measured, limit, passed."""
    fp32 = results["parity"]["onnx_fp32"]
    rows = [{"check": f"fp32 max abs diff ({name})", "measured": v, "limit": f"<= {th.fp32_atol:g}",
             "passed": v <= th.fp32_atol} for name, v in fp32["max_abs_diff"].items()]
    rows.append({"check": "fp32 argmax agreement", "measured": fp32["argmax_agreement"],
                 "limit": f">= {th.fp32_min_argmax_agreement:g}",
                 "passed": fp32["argmax_agreement"] >= th.fp32_min_argmax_agreement})
    if "edge_cases" in results:
        edge = edge_summary([c["onnx_fp32"] for c in results["edge_cases"]])
        rows += [{"check": "edge cases: fp32 max abs diff (logits)", "measured": edge["max_abs_diff"],
                  "limit": f"<= {th.fp32_atol:g}", "passed": edge["max_abs_diff"] <= th.fp32_atol},
                 {"check": "edge cases: fp32 argmax agreement", "measured": edge["argmax_agreement"],
                  "limit": f">= {th.fp32_min_argmax_agreement:g}",
                  "passed": edge["argmax_agreement"] >= th.fp32_min_argmax_agreement}]
        errors = [f"{k}: {c['case']}" for c in results["edge_cases"] for k, v in c.items()
                  if isinstance(v, dict) and "error" in v]
        if errors:
            rows.append({"check": "edge cases: ONNX runs every input", "measured": "; ".join(errors),
                         "limit": "no error", "passed": False})
    int8 = results.get("int8")
    if int8 and int8["recipe"]:
        rows += int8_checks(int8["attempts"][-1], th, primary)  # the search stops at the recipe that passed
    elif int8:
        rows.append({"check": "int8: a recipe within the limits", "measured": int8["reason"],
                     "limit": f"int8_fallback: {th.int8_fallback}", "passed": th.int8_fallback == "fp32"})
    return rows


# --- predictions on the eval set; edge-case inputs ------------------------------------------------
@dataclass
class Predictions:
    """A runner's logits on an eval set, batch by batch, with gold labels and the positions compared
    (every example; token tasks: every real token)."""

    logits: list
    labels: list
    keep: list

    def metrics(self, task: str, names: list[str]) -> dict:
        return metrics(task, self.logits, self.labels, names)

    def agreement(self, other: "Predictions") -> float:
        same = sum(int((a.argmax(-1) == b.argmax(-1))[k].sum())
                   for a, b, k in zip(self.logits, other.logits, self.keep))
        return same / sum(int(k.sum()) for k in self.keep)


def predict(runner, ds, pad_id: int, token_level: bool) -> Predictions:
    out = Predictions([], [], [])
    for inputs, gold in batches(ds, METRIC_BATCH, pad_id):
        out.logits.append(runner(inputs)["logits"])
        out.labels.append(gold)
        out.keep.append(inputs["attention_mask"].astype(bool) if token_level else np.ones(len(gold), bool))
    return out


# What users send and eval sets rarely hold; "far over max length" is built from data.max_seq_length.
EDGE_TEXTS = {"empty": "", "whitespace only": " \t\n ", "one character": "x",
              "emoji": "🍿🎬 loved it!!! 😍👍", "CJK": "这部电影的剧情非常精彩，演员的表演也很出色。",
              "Arabic": "كان الفيلم رائعا والتمثيل ممتازا"}
PAIR_TEXT = "an ordinary second sentence."


def edge_cases(tokenizer, data, task: str) -> list[dict]:
    """Each edge input tokenized as in evaluation (truncated to data.max_seq_length), alone in a batch of 1:
    no padding, so the empty text really is [CLS] [SEP]. Sentence-pair models get pairs."""
    long = " ".join(["a long review that goes on and on"] * (4 * data.max_seq_length))
    cases = [(name, text, None) for name, text in {**EDGE_TEXTS, "far over max length": long}.items()]
    if data.text_pair_column and not tasks.get(task).token_level:
        cases = [(name, text, PAIR_TEXT) for name, text, _ in cases]
        cases.append(("text pair, second far over max length", "a short first text", long))
    out = []
    for name, text, pair in cases:
        enc = tasks.get(task).encode(tokenizer, text, pair, data.max_seq_length)
        out.append({"case": name, "text": _shown(text), "pair": None if pair is None else _shown(pair),
                    "tokens": len(enc["input_ids"]),
                    "inputs": {k: np.array([enc[k]], np.int64) for k in MODEL_INPUTS if k in enc}})
    return out


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:37]}... ({len(text)} chars)"


def run_edge_cases(runner, cases: list[dict]) -> list[dict]:
    """The runner's outputs per case; an input it cannot run is recorded, not raised (it fails the gate)."""
    out = []
    for c in cases:
        try:
            out.append(runner(c["inputs"]))
        except Exception as e:  # noqa: BLE001 - any failure on an input is the finding
            out.append({"error": f"{type(e).__name__}: {e}".split("\n")[0]})
    return out


def compare_edge(reference: list[dict], got: list[dict]) -> list[dict]:
    rows = []
    for ref, out in zip(reference, got):
        pred = ref["logits"].argmax(-1)
        if "error" in out:
            rows.append({"error": out["error"], "agree": 0, "compared": int(pred.size)})
            continue
        rows.append({"max_abs_diff": float(np.abs(ref["logits"] - out["logits"]).max()),
                     "agree": int((pred == out["logits"].argmax(-1)).sum()), "compared": int(pred.size)})
    return rows


def edge_results(runners: dict, ref: Reference) -> list[dict]:
    """Per edge case: its text and token count, and each ONNX model's diff and agreement with PyTorch."""
    compared = {k: compare_edge(ref.edge_outputs, run_edge_cases(r, ref.cases)) for k, r in runners.items()
                if k != "pytorch"}
    return [{"case": c["case"], "text": c["text"], "pair": c["pair"], "tokens": c["tokens"],
             **{k: rows[i] for k, rows in compared.items()}} for i, c in enumerate(ref.cases)]


def edge_summary(per_case: list[dict]) -> dict:
    """One model over all edge cases: max abs diff, argmax agreement (per case; token tasks: per token)."""
    return {"max_abs_diff": max((c.get("max_abs_diff", 0.0) for c in per_case), default=0.0),
            "argmax_agreement": sum(c["agree"] for c in per_case) / max(1, sum(c["compared"] for c in per_case))}


@dataclass
class Reference:
    """What every ONNX model (fp32, each int8 recipe) is judged against: PyTorch on the same inputs."""

    task: str
    names: list[str]
    pad: int
    eval_ds: object
    sample: object  # the parity examples (also the inputs of the MatMul sensitivity ranking)
    cases: list[dict]
    predictions: Predictions
    edge_outputs: list[dict]

    @property
    def token_level(self) -> bool:
        return tasks.get(self.task).token_level

    @cached_property
    def metrics(self) -> dict:
        return self.predictions.metrics(self.task, self.names)

    def score(self, runner, ds) -> dict:
        """The task metrics of another runner on an eval set."""
        return predict(runner, ds, self.pad, self.token_level).metrics(self.task, self.names)


def measure_int8(path: Path, ref: Reference, cfg: ValidateConfig, threads: int) -> dict:
    """One int8 model against PyTorch: metric drop and agreement on the eval set, agreement on the edge
    cases, batch-1 latency; passed and the checks it failed (int8_checks)."""
    primary = tasks.get(ref.task).primary_metric
    runner = ort_runner(ort_session(path, threads))
    preds = predict(runner, ref.eval_ds, ref.pad, ref.token_level)
    got = preds.metrics(ref.task, ref.names)
    edge = compare_edge(ref.edge_outputs, run_edge_cases(runner, ref.cases))
    m = {"metrics": got, "metric_drop": metric_drop(ref.metrics, got, primary) if primary else None,
         "argmax_agreement": ref.predictions.agreement(preds),
         "edge_argmax_agreement": edge_summary(edge)["argmax_agreement"],
         "latency_b1_p50_ms": latency(runner, ref.eval_ds, 1, cfg.latency, ref.pad)["p50_ms"]}
    failed = [c["check"] for c in int8_checks(m, cfg.thresholds, primary) if not c["passed"]]
    return {**m, "passed": not failed, "failed": failed}


def choose_int8(cfg: ValidateConfig, staging: Path, ref: Reference, train, threads: int) -> dict:
    """Judge the export's int8; when it misses the gate, search other recipes (hpcnlp.quantize) within
    cfg.int8_search. The passing model is left as staging/model.int8.onnx. None passing: fp32 ships alone
    (the file is removed), or the run is rejected (thresholds.int8_fallback, applied by the gate)."""
    export_metrics = Path(cfg.onnx_dir) / "metrics.json"
    exported = json.loads(export_metrics.read_text()) if export_metrics.is_file() else {}
    made = exported.get("quantization") or {}
    recipe = Recipe(static=made.get("mode") == "static", per_channel=bool(made.get("per_channel")))
    s = cfg.int8_search
    quantizer = Quantizer(staging / "model.onnx", made.get("preset", "avx2"), lambda: calibration_set(
        train, s.calibration_samples, cfg.data.seed, ref.pad, cfg.data.max_seq_length))
    # ORT's quantizer cannot type the fused ops of an O1-O3 graph (see export): no new recipes from one.
    optimized = exported.get("optimization_level")
    int8 = staging / "model.int8.onnx"
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".int8-search-") as work:
        tried, chosen, why = search(
            recipe, int8, quantizer, lambda p: measure_int8(p, ref, cfg, threads), Path(work),
            max_attempts=0 if optimized else s.max_attempts, max_seconds=s.max_seconds,
            max_fp32_nodes=s.max_fp32_nodes,
            rank_feeds=lambda: (x for x, _ in batches(ref.sample, PARITY_BATCH, ref.pad)))
        if chosen is not None and chosen.path != int8:
            os.replace(chosen.path, int8)
        elif chosen is None and cfg.thresholds.int8_fallback == "fp32":
            int8.unlink()  # fp32 ships alone; a rejected bundle keeps the export's int8 for a look
    if optimized and chosen is None:
        why = (f"model.onnx is ORT-optimized (O{optimized}); other recipes need the plain graph: export with "
               "optimization_level: 0")
    out = {"exported_recipe": recipe.name, "attempts": [a.row() for a in tried], "search_stopped": why,
           "recipe": chosen.recipe.name if chosen else None,
           "fp32_nodes": list(chosen.recipe.fp32_nodes) if chosen else [],
           "latency_b1_p50_ms": chosen.measured["latency_b1_p50_ms"] if chosen else None, "reason": None}
    if chosen is None:
        best = max(tried, key=lambda a: a.measured["argmax_agreement"])
        out["reason"] = (f"no int8 recipe passed ({len(tried)} tried; search stopped: {why}); closest: "
                         f"{best.recipe.name}, failed: {', '.join(best.measured['failed'])}")
        log.warning("int8: %s; %s", out["reason"], "fp32 ships alone" if cfg.thresholds.int8_fallback == "fp32"
                    else "rejecting (int8_fallback: reject)")
    elif chosen.recipe != recipe:
        log.info("int8: the export's %s missed the gate; %s passed", recipe.name, chosen.recipe.name)
    return out


def report_sections(results: dict) -> list[str]:
    """validation.md sections of the int8 recipe search, the edge cases and the out-of-domain eval sets."""
    primary = tasks.get(results["task"]).primary_metric
    out = []
    int8 = results.get("int8")
    if int8:
        rows = [{"recipe": a["recipe"], f"{primary} drop": a["metric_drop"],
                 "flip rate": round(1 - a["argmax_agreement"], 4),
                 "edge-case flip rate": round(1 - a["edge_argmax_agreement"], 4),
                 "batch-1 p50 ms": a["latency_b1_p50_ms"], "passed": a["passed"],
                 "failed": ", ".join(a["failed"]) or "-"} for a in int8["attempts"]]
        if int8["recipe"]:
            verdict = (f"Shipped as model.int8.onnx: **{int8['recipe']}**, batch-1 p50 "
                       f"{int8['latency_b1_p50_ms']} ms."
                       + (f" MatMuls kept in fp32: {', '.join(f'`{n}`' for n in int8['fp32_nodes'])}."
                          if int8["fp32_nodes"] else ""))
        else:
            verdict = f"**No int8 model ships**: {int8['reason']}."
        out += ["## int8 recipes tried", "", f"In order, flip rate vs PyTorch on the whole eval set; search "
                f"stopped: {int8['search_stopped']}.", "", markdown_table(rows), "", verdict, ""]
    if "edge_cases" in results:
        rows = []
        for c in results["edge_cases"]:
            row = {"case": c["case"], "text": json.dumps(c["text"], ensure_ascii=False), "tokens": c["tokens"]}
            for k in ("onnx_fp32", "onnx_int8"):
                if k in c:
                    row[f"{k} max abs diff"] = c[k].get("max_abs_diff", c[k].get("error"))
                    row[f"{k} argmax agrees"] = f"{c[k]['agree']}/{c[k]['compared']}"
            rows.append(row)
        out += ["## Edge cases (gated)", "", "Each input alone (no padding), truncated to data.max_seq_length; "
                "ONNX vs PyTorch." + (f" Pairs: second text {json.dumps(PAIR_TEXT)}."
                                      if results["edge_cases"][0].get("pair") else ""), "",
                markdown_table(rows), ""]
    if results.get("extra_eval"):
        rows = [{"eval set": name, "file": e["file"], "examples": e["examples"],
                 **{k: m.get(primary) for k, m in e["metrics"].items()}}
                for name, e in {"in-domain": {"file": results["eval_file"], "examples": results["eval_examples"],
                                              "metrics": results["metrics"]}, **results["extra_eval"]}.items()]
        out += ["## Out-of-domain eval sets (reported, not gated)", "", f"{primary} per model.", "",
                markdown_table(rows), ""]
    return out


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
    if not tasks.labelled(task):
        log.error("validate gates classifiers (sequence, token); for a masked LM use export's Optimum check")
        return status.EXIT_CONFIG
    names = label_names(model_dir)
    threads = cfg.latency.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    data = load_data(task, cfg.data, tokenizer, model_dir)  # every eval row checked before anything is staged
    eval_ds = data.splits["validation"]
    pad = tokenizer.pad_token_id
    token_level = tasks.get(task).token_level

    staging = bundle.stage(Path(cfg.onnx_dir), Path(cfg.output_dir))
    try:
        model = auto_model_class(task).from_pretrained(model_dir).eval()
        runners = {"pytorch": torch_runner(model),
                   "onnx_fp32": ort_runner(ort_session(staging / "model.onnx", threads))}
        sample = eval_ds.select(range(min(cfg.num_examples, len(eval_ds))))
        cases = edge_cases(tokenizer, cfg.data, task)
        ref = Reference(task, names, pad, eval_ds, sample, cases,
                        predictions=predict(runners["pytorch"], eval_ds, pad, token_level),
                        edge_outputs=run_edge_cases(runners["pytorch"], cases))
        # The export's int8, or the first recipe of the search that passes; none: no model.int8.onnx.
        int8 = choose_int8(cfg, staging, ref, data.splits["train"], threads) \
            if (staging / "model.int8.onnx").is_file() else None
        if (staging / "model.int8.onnx").is_file():
            runners["onnx_int8"] = ort_runner(ort_session(staging / "model.int8.onnx", threads))
        results = {"task": task, "eval_file": data.files["validation"], "eval_examples": len(eval_ds),
                   "parity_examples": len(sample), "threads": threads,
                   "providers": providers(),
                   "parity": {k: parity(runners["pytorch"], r, sample, pad, token_level)
                              for k, r in runners.items() if k != "pytorch"},
                   "metrics": {k: ref.metrics if k == "pytorch" else ref.score(r, eval_ds) for k, r in runners.items()}}
        log.info("parity %s", {k: (v["max_abs_diff"], v["argmax_agreement"]) for k, v in results["parity"].items()})
        if int8:
            results["int8"] = int8
        results["edge_cases"] = edge_results(runners, ref)
        results["extra_eval"] = {name: {"file": data.files[name], "examples": len(data.splits[name]),
                                        "metrics": {k: ref.score(r, data.splits[name]) for k, r in runners.items()}}
                                 for name in cfg.data.extra_eval_files}  # reported, not gated
        results["latency"] = {k: {str(b): latency(r, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes}
                              for k, r in runners.items()}
        results["cpu"] = cpu()
        if "test" in data.splits:  # held-out data, reported beside the validation file's; the gate stays on that
            results.update(test_file=data.files["test"], test_examples=len(data.splits["test"]),
                           test_metrics={k: ref.score(r, data.splits["test"]) for k, r in runners.items()})
        checks = gate(results, cfg.thresholds, tasks.get(task).primary_metric)
        passed = all(c["passed"] for c in checks)
        results.update(checks=checks, passed=passed, wall_seconds=round(time.perf_counter() - t0, 2))
        write_reports(staging, cfg, task, names, results, passed)
        bundle.write_manifest(staging, {
            "name": cfg.name, "version": cfg.version, "task": task, "id2label": dict(enumerate(names)),
            "opset": _opset(staging / "model.onnx"), "source_model": {"path": model_dir,
                                                                       "sha256": bundle.dir_sha256(model_dir)},
            "thresholds": cfg.thresholds.model_dump(), "checks": checks, "passed": passed,
            "int8": {k: int8[k] for k in ("recipe", "fp32_nodes", "latency_b1_p50_ms", "reason")} if int8 else None})
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
            markdown_table(lat_rows), "", "![latency](latency.png)", ""] + report_sections(results)
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
    metric = tasks.get(v["task"]).primary_metric
    runtimes = [k for k in ("pytorch", "onnx_fp32", "onnx_int8") if k in v["metrics"]]
    return {"metric": ("PASSED: " if v["passed"] else "REJECTED: ")
            + ", ".join(f"{k} {v['metrics'][k][metric]:.3f}" for k in runtimes),
            "size": mb(path / "model.onnx", path / "model.int8.onnx"),
            "latency b1 p50": ", ".join(f"{k} {v['latency'][k]['1']['p50_ms']:.1f} ms" for k in runtimes
                                        if "1" in v["latency"].get(k, {})),
            "output": str(path)}


SPEC = JobSpec(name="validate", order=70, help="gate ONNX vs PyTorch (parity, metric, latency); ship or reject a bundle",
               config=ValidateConfig, check=check, run=run, single_process=True, is_complete=is_complete,
               summary_row=summary_row,
               status_file=lambda cfg: Path(cfg.output_dir) / cfg.name / f".{cfg.version}.status.json",
               slurm=SlurmDefaults(time="00:30:00", cpus_per_task=4,
                                   note="latency is measured on these CPUs: ask for the deployment CPU count"))
