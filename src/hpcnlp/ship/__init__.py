"""The ship side: from an ONNX export to a bundle deployment teams receive, or to a rejected one.

  onnx            onnxruntime sessions and runners (CUDA where onnxruntime has it, else CPU)
  measure         ONNX vs the PyTorch reference: parity, task metrics, edge cases, latency
  edge_cases      the inputs eval sets rarely hold (empty, emoji, CJK, far over max length...)
  gate            the judging: thresholds -> rows of check, measured, limit, passed
  quantize        int8 recipes for an fp32 ONNX model (export's, and the search's)
  int8_search     when the export's int8 misses the gate: other recipes until one passes
  report          validation.md, validation.json, latency.png, MODEL_CARD.md of a bundle
  card            MODEL_CARD.md
  bundle          stage, manifest, publish or reject, `hpcnlp verify`
  onnx_inference  a standalone script (onnxruntime + tokenizers + numpy) copied into every bundle

`hpcnlp validate` (hpcnlp.jobs.validate) runs them in that order. Nothing here imports hpcnlp.jobs:
job configs come in as parameters.
"""
