"""int8 recipes for an fp32 ONNX model (Optimum's ORTQuantizer). Shared by export (one recipe) and
validate's recipe search (hpcnlp.ship.int8_search).

A recipe is dynamic or static (QDQ, activation ranges calibrated on training rows), per-tensor or
per-channel weights, plus the MatMuls that need more precision than that:
- split, where the weight is a constant and a few input channels hold outliers (LLM.int8()'s decomposition,
  Dettmers et al. 2022): those channels times their weight rows in fp32, the rest in int8, summed. Dynamic
  int8 quantizes an activation with one scale per tensor, so one channel at 18x the others' range (layer 0's
  FFN output in MiniLM) coarsens every other value; without it the int8 MatMul keeps its speed and most of
  fp32's accuracy.
- blockwise 8-bit where the weight is a constant (onnxruntime's MatMulNBits: one weight scale per 32 inputs of
  each output channel, and the activations quantized per block of 32 at run time, so an outlier spoils its
  block, not the whole row);
- fp32 where it is not (attention's activation x activation products; onnxruntime's `nodes_to_exclude`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Recipe:
    static: bool = False  # False: activation ranges measured at run time (dynamic)
    per_channel: bool = False  # one weight scale per output channel instead of one per tensor
    blockwise_nodes: tuple[str, ...] = ()  # MatMul nodes quantized by blocks (8-bit MatMulNBits)
    fp32_nodes: tuple[str, ...] = ()  # MatMul nodes left unquantized
    split_nodes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (MatMul node, its input channels done in fp32)

    @property
    def name(self) -> str:
        name = ("static QDQ" if self.static else "dynamic") + (" per-channel" if self.per_channel else "")
        name += f" + {len(self.split_nodes)} MatMul(s) split (outlier channels in fp32)" if self.split_nodes else ""
        name += f" + {len(self.blockwise_nodes)} MatMul(s) blockwise" if self.blockwise_nodes else ""
        return name + (f" + {len(self.fp32_nodes)} MatMul(s) in fp32" if self.fp32_nodes else "")


# MatMulNBits, 8 bits, blocks of 32 along the input, symmetric weights, accuracy_level 4 (int8 activations,
# quantized per block).
BLOCKWISE = {"bits": 8, "block_size": 32, "is_symmetric": True, "accuracy_level": 4}
# Blockwise is used for the sensitive MatMuls only where it beats fp32 by this much on the node (blockwise_probe):
# its kernels are fast where the CPU has int8 dot products and slow where it has not. On the Xeon with AMX/VNNI
# of docs/performance.md, the bench teacher with its most sensitive MatMul blockwise ran 10.2 ms at batch 1
# against 10.8 ms with it in fp32; on an AVX2-only EPYC that MatMul alone ran 2.5x slower blockwise than in
# fp32. A near-tie stays fp32: exact, and a plain op every runtime has.
BLOCKWISE_MARGIN = 1.1
PROBE_S = 0.2  # timed repeats of the probe stop after this (at least 3 of each)


# An input channel is an outlier where its max |x| over the rows seen is this many times the median channel's
# (LLM.int8() uses an absolute 6.0; a ratio does not depend on the model's scale). Layer 0's FFN output of the
# bench teacher: one channel at 17.8x, the next at 4.3x. At most 1/16 of a MatMul's inputs are split off.
OUTLIER_RATIO = 6.0
MAX_OUTLIER_FRACTION = 1 / 16


def outlier_channels(maxima: np.ndarray) -> tuple[int, ...]:
    """The outlier input channels of a MatMul, largest first, from each channel's max |x| (`maxima`)."""
    limit = OUTLIER_RATIO * float(np.median(maxima))
    top = np.argsort(-maxima, kind="stable")[: max(1, int(len(maxima) * MAX_OUTLIER_FRACTION))]
    return tuple(int(c) for c in top if maxima[c] > limit)


def split_outliers(model, split: tuple[tuple[str, tuple[int, ...]], ...]) -> list[str]:
    """Rewrite each MatMul of `split` (node, channels) in the fp32 ONNX `model`, in place, as
    MatMul(x * keep, W with those rows zeroed) + MatMul(x[..., channels], W[channels]): the same product (the
    first term keeps the node's name, for int8). Returns the nodes of the fp32 side, for nodes_to_exclude."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    side = []
    for node, channels in split:
        i, matmul = next((i, n) for i, n in enumerate(graph.node) if n.name == node)
        weight = numpy_helper.to_array(weights[matmul.input[1]])
        keep = np.ones(weight.shape[0], weight.dtype)
        keep[list(channels)] = 0
        p = f"{node}/split"
        graph.initializer.extend(
            [
                numpy_helper.from_array(weight * keep[:, None], p + "/weight"),
                numpy_helper.from_array(keep, p + "/keep"),
                numpy_helper.from_array(np.array(channels, np.int64), p + "/channels"),
                numpy_helper.from_array(weight[list(channels)], p + "/outlier_weight"),
            ]
        )
        x, y = matmul.input[0], matmul.output[0]
        rewritten = [
            helper.make_node("Mul", [x, p + "/keep"], [p + "/inliers"], name=p + "/Mul"),
            helper.make_node("MatMul", [p + "/inliers", p + "/weight"], [p + "/inlier_product"], name=node),
            helper.make_node("Gather", [x, p + "/channels"], [p + "/outliers"], name=p + "/Gather", axis=-1),
            helper.make_node(
                "MatMul", [p + "/outliers", p + "/outlier_weight"], [p + "/outlier_product"], name=p + "/MatMul"
            ),
            helper.make_node("Add", [p + "/inlier_product", p + "/outlier_product"], [y], name=p + "/Add"),
        ]
        graph.node.remove(matmul)
        for k, n in enumerate(rewritten):
            graph.node.insert(i + k, n)
        side += [p + "/Gather", p + "/MatMul"]
        if not any(matmul.input[1] in n.input for n in graph.node):  # the original weight, now unused
            graph.initializer.remove(weights[matmul.input[1]])
    return side


def quantize_blockwise(model, nodes: tuple[str, ...]):
    """`nodes` (MatMuls with a constant 2-D weight) of the ONNX `model` as MatMulNBits; the rest unchanged."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, nodes_to_include=list(nodes), **BLOCKWISE)
    with _quiet_root_logger():
        quantizer.process()
    made = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    if made != len(nodes):
        raise ValueError(f"blockwise int8: {made} of {len(nodes)} MatMuls quantized (the rest have no constant weight)")
    return quantizer.model.model


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

        if recipe.static and recipe.split_nodes:
            raise ValueError("split MatMuls need dynamic int8 (static ranges are calibrated on the unsplit graph)")
        # Optimum also writes config, tokenizer and ort_config.json where it saves: a scratch dir, only the
        # model is kept.
        import onnx

        with tempfile.TemporaryDirectory(dir=Path(dest).parent, prefix=".quantize-") as tmp:
            fp32, side = self.fp32, []
            if recipe.split_nodes:
                model = onnx.load(str(self.fp32))
                side = split_outliers(model, recipe.split_nodes)
                fp32 = Path(tmp) / "split.onnx"
                onnx.save(model, str(fp32))
                if (self.fp32.parent / "config.json").is_file():  # Optimum warns when it has none beside the model
                    shutil.copy(self.fp32.parent / "config.json", tmp)
            qconfig = getattr(AutoQuantizationConfig, self.preset)(
                is_static=recipe.static,
                per_channel=recipe.per_channel,
                nodes_to_exclude=[*recipe.fp32_nodes, *recipe.blockwise_nodes, *side],
            )
            quantizer = ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name)
            if recipe.static and self._ranges is None:
                if self.calibration is None:
                    raise ValueError("static quantization needs calibration rows")
                calib = self.calibration()
                self.calibration_rows = len(calib)
                with _quiet_root_logger():
                    self._ranges = quantizer.fit(
                        dataset=calib,
                        calibration_config=AutoCalibrationConfig.minmax(calib),
                        operators_to_quantize=qconfig.operators_to_quantize,
                        onnx_augmented_model_name=Path(tmp) / "augmented_model.onnx",
                    )
            with _quiet_root_logger():
                quantizer.quantize(
                    quantization_config=qconfig,
                    save_dir=tmp,
                    calibration_tensors_range=self._ranges if recipe.static else None,
                )
            made = Path(tmp) / f"{fp32.stem}_quantized.onnx"
            if recipe.blockwise_nodes:
                onnx.save(quantize_blockwise(onnx.load(str(made)), recipe.blockwise_nodes), str(made))
            os.replace(made, dest)
        return Path(dest)


def blockwise_probe(fp32: Path, node: str, rows: int, threads: int) -> dict:
    """Time the MatMul `node` of `fp32` (constant weight) alone on `rows` input rows and `threads` threads,
    as fp32 and as blockwise 8-bit, alternating so that other load hits both alike; the best repeat of each.
    {"fp32_us", "blockwise_us", "blockwise": whether blockwise wins by BLOCKWISE_MARGIN}."""
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = onnx.load(str(fp32)).graph
    matmul = next(n for n in graph.node if n.name == node)
    weight = next(i for i in graph.initializer if i.name == matmul.input[1])
    k, n = weight.dims
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", weight.name], ["y"], name="probe")],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
            [weight],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    plain.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {
        name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, m in (("fp32", plain), ("blockwise", quantize_blockwise(plain, ("probe",))))
    }
    x = {"x": np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)}
    best = {name: float("inf") for name in sessions}
    for s in sessions.values():
        s.run(None, x)  # warm-up
    start, repeats = time.monotonic(), 0
    while repeats < 3 or time.monotonic() - start < PROBE_S:
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, x)
            best[name] = min(best[name], time.perf_counter() - t)
        repeats += 1
    return {
        "fp32_us": round(best["fp32"] * 1e6),
        "blockwise_us": round(best["blockwise"] * 1e6),
        "blockwise": best["fp32"] >= BLOCKWISE_MARGIN * best["blockwise"],
    }
