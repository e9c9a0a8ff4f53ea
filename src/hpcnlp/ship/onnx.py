"""onnxruntime for the gate: sessions on CUDA where onnxruntime has it (else CPU), and runners with the
same call as hpcnlp.tasks.torch_runner (model inputs -> named outputs), so that every model is measured
the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def providers() -> list[str]:
    """CUDA where onnxruntime has it, else CPU."""
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


# onnxruntime's CPU SkipLayerNormalization kernel is several times slower than the Add + LayerNormalization it
# fuses (1.32, 1 x 128 x 384, 1 thread: 311 vs 48 us; `make bench` re-measures it on each CPU). Dynamic int8
# graphs match the pattern six times in a 6-layer BERT (fp32 exports don't): the fusion cost the int8 teacher
# 13% of its batch-1 latency. Kept on CUDA. The bundle's onnx_inference.py and its model card say the same.
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    on = providers()
    disabled = [] if "CUDAExecutionProvider" in on else CPU_DISABLED_OPTIMIZERS
    return ort.InferenceSession(str(path), opts, providers=on, disabled_optimizers=disabled)


def ort_runner(session):
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))

    return run


def opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file was exported with (the manifest's)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def external_data_files(path: Path) -> list[str]:
    """The files an ONNX model keeps its weights in beside itself (a model over 2 GB must: protobuf's
    limit), as the model names them; [] for a self-contained one. Read from the graph only."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})
