"""The int8 recipe search `hpcnlp validate` runs when the export's int8 misses the gate.

It tries, in order: the export's own recipe, dynamic per-channel, static QDQ per-channel, then the one of
those closest to PyTorch with its most sensitive MatMuls given more precision (hpcnlp.ship.quantize): split
where the weight is a constant and a few input channels hold outliers (those in fp32, the rest int8; dynamic
recipes), else blockwise 8-bit where the weight is a constant and a probe on this node finds blockwise
faster than fp32, else fp32; one more each time; it stops at the first recipe
that passes, or when its budget (attempts, seconds, sensitive MatMuls) is spent. The order is by cost:
per-channel weights cost nothing at run time, static QDQ needs calibration rows and fixed ranges, and every
sensitive MatMul gives back part of int8's speed. Recipes are made by
hpcnlp.ship.quantize; each is measured against the PyTorch reference and judged with the gate's int8 rows.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hpcnlp import tasks
from hpcnlp.ship.edge_cases import compare_edge, edge_summary, run_edge_cases
from hpcnlp.ship.gate import int8_checks
from hpcnlp.ship.measure import PARITY_BATCH, Reference, metric_drop, predict
from hpcnlp.ship.onnx import ort_runner, ort_session
from hpcnlp.ship.quantize import Quantizer, Recipe, blockwise_probe, calibration_set, outlier_channels
from hpcnlp.tasks import batches, latency

log = logging.getLogger(__name__)


def _with_outputs(model, tensors: set[str], feeds):
    """Run the ONNX `model` (changed in place) on each of `feeds` with `tensors` as extra outputs: yields
    {output name: array} per feed."""
    import onnxruntime as ort
    from onnx import helper

    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in sorted(tensors - outputs))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names, wanted = [o.name for o in session.get_outputs()], {i.name for i in session.get_inputs()}
    for inputs in feeds:
        yield dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))


def sensitive_matmuls(fp32: Path, int8: Path, feeds) -> list[tuple[str, float]]:
    """The MatMuls of `int8`, most damaging first: (node name, mean relative error of its output).

    One run of the int8 model with every MatMul's inputs and output as extra outputs; a node's own error
    is |int8 output - inputs @ fp32 weight| / |inputs @ fp32 weight|, on the inputs the int8 model really
    gave it (attention's activation x activation MatMuls alike). Why not exclude each node in turn and
    re-quantize: that is one quantization and evaluation per node (48 for MiniLM-L6, 3-5 s each here),
    minutes before the first fp32 attempt. MatMul output names survive quantization; nodes left in fp32
    come out with error ~0 (blockwise ones are not ranked: their output is a MatMulNBits')."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(fp32)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = onnx.load(str(int8))
    made = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    matmuls = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and n.output[0] in made and all(i in made or i in weights for i in n.input)
    ]
    tensors = {t for n in matmuls for t in (*n.input, n.output[0]) if t not in weights}
    error, runs = {n.name: 0.0 for n in matmuls}, 0
    for got in _with_outputs(model, tensors, feeds):
        runs += 1
        for n in matmuls:
            a, b = (got[i] if i in got else weights[i] for i in n.input)
            exact = a @ b
            error[n.name] += float(np.abs(got[n.output[0]] - exact).mean() / (np.abs(exact).mean() + 1e-12))
    return sorted(((name, e / max(runs, 1)) for name, e in error.items()), key=lambda kv: -kv[1])


def outlier_inputs(fp32: Path, nodes: list[str], feeds) -> dict[str, tuple[int, ...]]:
    """The MatMuls of `nodes` (in `fp32`) whose input has outlier channels on `feeds`: node -> channels
    (quantize.outlier_channels of each channel's max |x|)."""
    import onnx

    model = onnx.load(str(fp32))
    inputs = {n.name: n.input[0] for n in model.graph.node if n.name in nodes}
    maxima: dict[str, np.ndarray] = {}
    for got in _with_outputs(model, set(inputs.values()), feeds):
        for t in set(inputs.values()):
            m = np.abs(got[t]).reshape(-1, got[t].shape[-1]).max(0)
            maxima[t] = np.maximum(maxima[t], m) if t in maxima else m
    found = {node: outlier_channels(maxima[t]) for node, t in inputs.items() if t in maxima}
    return {node: channels for node, channels in found.items() if channels}


def constant_weight_matmuls(fp32: Path) -> set[str]:
    """The MatMuls of `fp32` whose second input is a 2-D initializer: those MatMulNBits can take."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    return {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}


def sensitive(recipe: Recipe) -> tuple[str, ...]:
    return tuple(n for n, _ in recipe.split_nodes) + recipe.blockwise_nodes + recipe.fp32_nodes


@dataclass
class Attempt:
    recipe: Recipe
    path: Path
    measured: dict  # what `measure` returned: at least "passed" and "argmax_agreement"
    seconds: float

    def row(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "blockwise_nodes": list(self.recipe.blockwise_nodes),
            "fp32_nodes": list(self.recipe.fp32_nodes),
            "split_nodes": {n: list(c) for n, c in self.recipe.split_nodes},
            **self.measured,
            "seconds": round(self.seconds, 1),
        }


def search(
    exported: Recipe,
    exported_path: Path,
    quantizer: Quantizer,
    measure: Callable[[Path], dict],
    work: Path,
    max_attempts: int,
    max_seconds: float,
    max_sensitive_nodes: int,
    rank_feeds: Callable,
    blockwise_pays: Callable[[str], bool],
) -> tuple[list[Attempt], Attempt | None, str]:
    """Try recipes (order in the module doc) until `measure(path)["passed"]`. Returns every attempt, the
    passing one (None if none passed) and why the search stopped. `max_attempts` counts the recipes made
    here, not the export's own; `rank_feeds()` yields the inputs the sensitivity ranking runs on;
    `blockwise_pays(node)`, asked once with the most sensitive MatMul: blockwise 8-bit beats fp32 on it."""
    t0 = time.monotonic()
    tried = [Attempt(exported, exported_path, measure(exported_path), time.monotonic() - t0)]
    queue = [r for r in (Recipe(per_channel=True), Recipe(static=True, per_channel=True)) if r != exported]
    ranked: list[str] | None = None
    split: dict[str, tuple[int, ...]] = {}  # MatMul -> its outlier input channels (constant weight, dynamic)
    blockwise: set[str] = set()  # the other MatMuls with a constant weight, if blockwise pays
    while not tried[-1].measured["passed"]:
        if len(tried) - 1 >= max_attempts:
            return tried, None, f"max_attempts ({max_attempts}) reached"
        if time.monotonic() - t0 >= max_seconds:
            return tried, None, f"max_seconds ({max_seconds:g}) spent"
        start = time.monotonic()
        if queue:
            recipe = queue.pop(0)
        else:
            k = len(sensitive(tried[-1].recipe)) + 1
            if k > max_sensitive_nodes:
                return tried, None, f"max_sensitive_nodes ({max_sensitive_nodes}) given more precision"
            # The base: the closest to PyTorch of the recipes without sensitive nodes (the metric drop can
            # hide flips that cancel out; the agreement cannot).
            base = max((a for a in tried if not sensitive(a.recipe)), key=lambda a: a.measured["argmax_agreement"])
            if ranked is None:
                ranked = [name for name, _ in sensitive_matmuls(quantizer.fp32, base.path, rank_feeds())]
                log.info("int8: most sensitive MatMuls of %s: %s", base.recipe.name, ranked[:max_sensitive_nodes])
                weighted = constant_weight_matmuls(quantizer.fp32)
                constant = [n for n in ranked[:max_sensitive_nodes] if n in weighted]
                if not base.recipe.static:
                    split = outlier_inputs(quantizer.fp32, constant, rank_feeds())
                    log.info("int8: outlier input channels: %s", split or "none")
                top = next((n for n in constant if n not in split), None)
                blockwise = set(constant) - set(split) if top is not None and blockwise_pays(top) else set()
            if k > len(ranked):
                return tried, None, "every MatMul given more precision"
            top_k = ranked[:k]
            recipe = replace(
                base.recipe,
                split_nodes=tuple((n, split[n]) for n in top_k if n in split),
                blockwise_nodes=tuple(n for n in top_k if n in blockwise),
                fp32_nodes=tuple(n for n in top_k if n not in split and n not in blockwise),
            )
        path = quantizer(recipe, work / f"int8-{len(tried)}.onnx")
        tried.append(Attempt(recipe, path, measure(path), time.monotonic() - start))
        log.info("int8 recipe %s: %s", recipe.name, "passed" if tried[-1].measured["passed"] else "failed")
    return tried, tried[-1], "passed"


def measure_int8(path: Path, ref: Reference, cfg, threads: int) -> dict:
    """One int8 model against PyTorch: metric drop and agreement on the eval set, agreement on the edge
    cases, batch-1 latency; passed and the checks it failed (int8_checks). cfg: validate's config (latency,
    thresholds)."""
    primary = tasks.get(ref.task).primary_metric
    runner = ort_runner(ort_session(path, threads))
    preds = predict(runner, ref.eval_ds, ref.pad, ref.token_level)
    got = preds.metrics(ref.task, ref.names)
    edge = compare_edge(ref.edge_outputs, run_edge_cases(runner, ref.cases))
    m = {
        "metrics": got,
        "metric_drop": metric_drop(ref.metrics, got, primary) if primary else None,
        "argmax_agreement": ref.predictions.agreement(preds),
        "edge_argmax_agreement": edge_summary(edge)["argmax_agreement"],
        "latency_b1_p50_ms": latency(runner, ref.eval_ds, 1, cfg.latency, ref.pad)["p50_ms"],
    }
    failed = [c["check"] for c in int8_checks(m, cfg.thresholds, primary) if not c["passed"]]
    return {**m, "passed": not failed, "failed": failed}


def choose_int8(cfg, staging: Path, ref: Reference, train, threads: int) -> dict | None:
    """Judge the export's int8; when it misses the gate, search other recipes within cfg.int8_search
    (cfg: validate's config). The passing model is left as staging/model.int8.onnx. None passing: fp32
    ships alone (the file is removed), or the run is rejected (thresholds.int8_fallback, applied by the
    gate). The search's record for validation.json; None when the export made no int8 model."""
    int8 = staging / "model.int8.onnx"
    if not int8.is_file():
        return None
    export_metrics = Path(cfg.onnx_dir) / "metrics.json"
    exported = json.loads(export_metrics.read_text()) if export_metrics.is_file() else {}
    made = exported.get("quantization") or {}
    recipe = Recipe(static=made.get("mode") == "static", per_channel=bool(made.get("per_channel")))
    s = cfg.int8_search
    quantizer = Quantizer(
        staging / "model.onnx",
        made.get("preset", "avx2"),
        lambda: calibration_set(train, s.calibration_samples, cfg.data.seed, ref.pad, cfg.data.max_seq_length),
    )
    # ORT's quantizer cannot type the fused ops of an O1-O3 graph (see export): no new recipes from one.
    optimized = exported.get("optimization_level")
    probe = {}

    def blockwise_pays(node: str) -> bool:
        probe.update(node=node, **blockwise_probe(quantizer.fp32, node, cfg.latency.seq_length, threads))
        log.info(
            "int8: %s alone at batch 1 x %d: fp32 %d us, blockwise 8-bit %d us: sensitive MatMuls %s",
            node,
            cfg.latency.seq_length,
            probe["fp32_us"],
            probe["blockwise_us"],
            "blockwise" if probe["blockwise"] else "in fp32",
        )
        return probe["blockwise"]

    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".int8-search-") as work:
        tried, chosen, why = search(
            recipe,
            int8,
            quantizer,
            lambda p: measure_int8(p, ref, cfg, threads),
            Path(work),
            max_attempts=0 if optimized else s.max_attempts,
            max_seconds=s.max_seconds,
            max_sensitive_nodes=s.max_sensitive_nodes,
            rank_feeds=lambda: (x for x, _ in batches(ref.sample, PARITY_BATCH, ref.pad)),
            blockwise_pays=blockwise_pays,
        )
        if chosen is not None and chosen.path != int8:
            os.replace(chosen.path, int8)
        elif chosen is None and cfg.thresholds.int8_fallback == "fp32":
            int8.unlink()  # fp32 ships alone; a rejected bundle keeps the export's int8 for a look
    if optimized and chosen is None:
        why = (
            f"model.onnx is ORT-optimized (O{optimized}); other recipes need the plain graph: export with "
            "optimization_level: 0"
        )
    out = {
        "exported_recipe": recipe.name,
        "attempts": [a.row() for a in tried],
        "search_stopped": why,
        "recipe": chosen.recipe.name if chosen else None,
        "blockwise_nodes": list(chosen.recipe.blockwise_nodes) if chosen else [],
        "fp32_nodes": list(chosen.recipe.fp32_nodes) if chosen else [],
        "split_nodes": {n: list(c) for n, c in chosen.recipe.split_nodes} if chosen else {},
        "blockwise_probe": probe or None,  # fp32 vs blockwise on the most sensitive MatMul, when the search got there
        "latency_b1_p50_ms": chosen.measured["latency_b1_p50_ms"] if chosen else None,
        "reason": None,
    }
    if chosen is None:
        best = max(tried, key=lambda a: a.measured["argmax_agreement"])
        out["reason"] = (
            f"no int8 recipe passed ({len(tried)} tried; search stopped: {why}); closest: "
            f"{best.recipe.name}, failed: {', '.join(best.measured['failed'])}"
        )
        log.warning(
            "int8: %s; %s",
            out["reason"],
            "fp32 ships alone" if cfg.thresholds.int8_fallback == "fp32" else "rejecting (int8_fallback: reject)",
        )
    elif chosen.recipe != recipe:
        log.info("int8: the export's %s missed the gate; %s passed", recipe.name, chosen.recipe.name)
    return out
