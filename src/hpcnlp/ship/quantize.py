"""int8 recipes for an fp32 ONNX model (Optimum's ORTQuantizer). Shared by export (one recipe) and
validate's recipe search (hpcnlp.ship.int8_search).

A recipe is dynamic or static (QDQ, activation ranges calibrated on training rows), per-tensor or
per-channel weights, plus MatMul nodes kept in fp32 (onnxruntime's `nodes_to_exclude`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
            is_static=recipe.static, per_channel=recipe.per_channel, nodes_to_exclude=list(recipe.fp32_nodes)
        )
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
            os.replace(Path(tmp) / f"{self.fp32.stem}_quantized.onnx", dest)
        return Path(dest)
