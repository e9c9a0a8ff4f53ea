"""int8 recipes for an fp32 ONNX model (Optimum's ORTQuantizer), and the search `hpcnlp validate` runs
when the export's int8 misses the gate. Shared by export (one recipe) and validate (the search).

A recipe is dynamic or static (QDQ, activation ranges calibrated on training rows), per-tensor or
per-channel weights, plus MatMul nodes kept in fp32 (onnxruntime's `nodes_to_exclude`). The search
tries, in order: the export's own recipe, dynamic per-channel, static QDQ per-channel, then the one of
those closest to PyTorch with its most sensitive MatMuls in fp32, one more each time; it stops at the
first recipe that passes, or when its budget (attempts, seconds, fp32 MatMuls) is spent. The order is
by cost: per-channel weights cost nothing at run time, static QDQ needs calibration rows and fixed
ranges, and every MatMul kept in fp32 gives back part of int8's speed and size.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    static: bool = False  # False: activation ranges measured at run time (dynamic)
    per_channel: bool = False  # one weight scale per output channel instead of one per tensor
    fp32_nodes: tuple[str, ...] = ()  # MatMul nodes left unquantized

    @property
    def name(self) -> str:
        name = ("static QDQ" if self.static else "dynamic") + (" per-channel" if self.per_channel else "")
        return name + (f" + {len(self.fp32_nodes)} MatMul(s) in fp32" if self.fp32_nodes else "")


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer logs one INFO line per tensor to the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_set(train, samples: int, seed: int, pad_id: int, seq_length: int):
    """Rows of the (tokenized) training split, shuffled, padded to one length (static ranges need fixed shapes)."""
    from datasets import Dataset

    from hpcnlp.tasks import MODEL_INPUTS, batches

    train = train.shuffle(seed=seed)
    train = train.select(range(min(samples, len(train))))
    inputs, _ = next(batches(train, len(train), pad_id, pad_to=seq_length))
    return Dataset.from_dict({k: v.tolist() for k, v in inputs.items() if k in MODEL_INPUTS})


class Quantizer:
    """int8 copies of one plain (not ORT-optimized) fp32 ONNX file. `calibration()` returns the rows of
    static recipes; their activation ranges are computed once and reused by every static recipe."""

    def __init__(self, fp32: Path, preset: str, calibration: Callable | None = None):
        self.fp32, self.preset, self.calibration = Path(fp32), preset, calibration
        self.calibration_rows: int | None = None
        self._ranges = None

    def __call__(self, recipe: Recipe, dest: Path) -> Path:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

        qconfig = getattr(AutoQuantizationConfig, self.preset)(
            is_static=recipe.static, per_channel=recipe.per_channel, nodes_to_exclude=list(recipe.fp32_nodes))
        quantizer = ORTQuantizer.from_pretrained(self.fp32.parent, file_name=self.fp32.name)
        # Optimum also writes config, tokenizer and ort_config.json where it saves: a scratch dir, only the
        # model is kept.
        with tempfile.TemporaryDirectory(dir=Path(dest).parent, prefix=".quantize-") as tmp:
            if recipe.static and self._ranges is None:
                if self.calibration is None:
                    raise ValueError("static quantization needs calibration rows")
                calib = self.calibration()
                self.calibration_rows = len(calib)
                with _quiet_root_logger():
                    self._ranges = quantizer.fit(dataset=calib, calibration_config=AutoCalibrationConfig.minmax(calib),
                                                 operators_to_quantize=qconfig.operators_to_quantize,
                                                 onnx_augmented_model_name=Path(tmp) / "augmented_model.onnx")
            with _quiet_root_logger():
                quantizer.quantize(quantization_config=qconfig, save_dir=tmp,
                                   calibration_tensors_range=self._ranges if recipe.static else None)
            os.replace(Path(tmp) / f"{self.fp32.stem}_quantized.onnx", dest)
        return Path(dest)


def sensitive_matmuls(fp32: Path, int8: Path, feeds) -> list[tuple[str, float]]:
    """The MatMuls of `int8`, most damaging first: (node name, mean relative error of its output).

    One run of the int8 model with every MatMul's inputs and output as extra outputs; a node's own error
    is |int8 output - inputs @ fp32 weight| / |inputs @ fp32 weight|, on the inputs the int8 model really
    gave it (attention's activation x activation MatMuls alike). Why not exclude each node in turn and
    re-quantize: that is one quantization and evaluation per node (48 for MiniLM-L6, 3-5 s each here),
    minutes before the first fp32 attempt. MatMul output names survive quantization; nodes left in fp32
    come out with error ~0."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = onnx.load(str(fp32)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = onnx.load(str(int8))
    made = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.output[0] in made
               and all(i in made or i in weights for i in n.input)]
    outputs = {o.name for o in model.graph.output}
    extra = sorted({t for n in matmuls for t in (*n.input, n.output[0]) if t not in weights} - outputs)
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names, wanted = [o.name for o in session.get_outputs()], {i.name for i in session.get_inputs()}
    error, runs = {n.name: 0.0 for n in matmuls}, 0
    for inputs in feeds:
        got = dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))
        runs += 1
        for n in matmuls:
            a, b = (got[i] if i in got else weights[i] for i in n.input)
            exact = a @ b
            error[n.name] += float(np.abs(got[n.output[0]] - exact).mean() / (np.abs(exact).mean() + 1e-12))
    return sorted(((name, e / max(runs, 1)) for name, e in error.items()), key=lambda kv: -kv[1])


@dataclass
class Attempt:
    recipe: Recipe
    path: Path
    measured: dict  # what `measure` returned: at least "passed" and "argmax_agreement"
    seconds: float

    def row(self) -> dict:
        return {"recipe": self.recipe.name, "fp32_nodes": list(self.recipe.fp32_nodes), **self.measured,
                "seconds": round(self.seconds, 1)}


def search(exported: Recipe, exported_path: Path, quantizer: Quantizer, measure: Callable[[Path], dict],
           work: Path, max_attempts: int, max_seconds: float, max_fp32_nodes: int,
           rank_feeds: Callable) -> tuple[list[Attempt], Attempt | None, str]:
    """Try recipes (order in the module doc) until `measure(path)["passed"]`. Returns every attempt, the
    passing one (None if none passed) and why the search stopped. `max_attempts` counts the recipes made
    here, not the export's own; `rank_feeds()` yields the inputs the sensitivity ranking runs on."""
    t0 = time.monotonic()
    tried = [Attempt(exported, exported_path, measure(exported_path), time.monotonic() - t0)]
    queue = [r for r in (Recipe(per_channel=True), Recipe(static=True, per_channel=True)) if r != exported]
    ranked: list[str] | None = None
    while not tried[-1].measured["passed"]:
        if len(tried) - 1 >= max_attempts:
            return tried, None, f"max_attempts ({max_attempts}) reached"
        if time.monotonic() - t0 >= max_seconds:
            return tried, None, f"max_seconds ({max_seconds:g}) spent"
        start = time.monotonic()
        if queue:
            recipe = queue.pop(0)
        else:
            k = len(tried[-1].recipe.fp32_nodes) + 1
            if k > max_fp32_nodes:
                return tried, None, f"max_fp32_nodes ({max_fp32_nodes}) kept in fp32"
            # The base: the closest to PyTorch of the recipes without fp32 nodes (the metric drop can hide
            # flips that cancel out; the agreement cannot).
            base = max((a for a in tried if not a.recipe.fp32_nodes), key=lambda a: a.measured["argmax_agreement"])
            if ranked is None:
                ranked = [name for name, _ in sensitive_matmuls(quantizer.fp32, base.path, rank_feeds())]
                log.info("int8: most sensitive MatMuls of %s: %s", base.recipe.name, ranked[:max_fp32_nodes])
            if k > len(ranked):
                return tried, None, "every MatMul kept in fp32"
            recipe = replace(base.recipe, fp32_nodes=tuple(ranked[:k]))
        path = quantizer(recipe, work / f"int8-{len(tried)}.onnx")
        tried.append(Attempt(recipe, path, measure(path), time.monotonic() - start))
        log.info("int8 recipe %s: %s", recipe.name, "passed" if tried[-1].measured["passed"] else "failed")
    return tried, tried[-1], "passed"
