"""Edge-case inputs: what users send and eval sets rarely hold (empty text, whitespace, one character,
emoji, CJK, Arabic, far over max length; sentence pairs for pair models). Every ONNX model must run them
all and agree with PyTorch on them (the gate's edge-case rows)."""

from __future__ import annotations

import numpy as np

from hpcnlp import tasks
from hpcnlp.tasks import MODEL_INPUTS

# What users send and eval sets rarely hold; "far over max length" is built from data.max_seq_length.
EDGE_TEXTS = {
    "empty": "",
    "whitespace only": " \t\n ",
    "one character": "x",
    "emoji": "🍿🎬 loved it!!! 😍👍",
    "CJK": "这部电影的剧情非常精彩，演员的表演也很出色。",
    "Arabic": "كان الفيلم رائعا والتمثيل ممتازا",
}
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
        out.append(
            {
                "case": name,
                "text": _shown(text),
                "pair": None if pair is None else _shown(pair),
                "tokens": len(enc["input_ids"]),
                "inputs": {k: np.array([enc[k]], np.int64) for k in MODEL_INPUTS if k in enc},
            }
        )
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
        rows.append(
            {
                "max_abs_diff": float(np.abs(ref["logits"] - out["logits"]).max()),
                "agree": int((pred == out["logits"].argmax(-1)).sum()),
                "compared": int(pred.size),
            }
        )
    return rows


def edge_results(runners: dict, cases: list[dict], reference: list[dict]) -> list[dict]:
    """Per edge case: its text and token count, and each ONNX model's diff and agreement with PyTorch
    (`reference`: PyTorch's outputs on the cases)."""
    compared = {k: compare_edge(reference, run_edge_cases(r, cases)) for k, r in runners.items() if k != "pytorch"}
    return [
        {
            "case": c["case"],
            "text": c["text"],
            "pair": c["pair"],
            "tokens": c["tokens"],
            **{k: rows[i] for k, rows in compared.items()},
        }
        for i, c in enumerate(cases)
    ]


def edge_summary(per_case: list[dict]) -> dict:
    """One model over all edge cases: max abs diff, argmax agreement (per case; token tasks: per token)."""
    return {
        "max_abs_diff": max((c.get("max_abs_diff", 0.0) for c in per_case), default=0.0),
        "argmax_agreement": sum(c["agree"] for c in per_case) / max(1, sum(c["compared"] for c in per_case)),
    }
