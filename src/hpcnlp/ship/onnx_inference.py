"""Run an hpcnlp bundle with onnxruntime + tokenizers + numpy only: no torch, no transformers.

    python onnx_inference.py BUNDLE "a gripping, beautifully acted film" "a tedious mess"
    python onnx_inference.py BUNDLE "Jane Doe flew to Paris on Monday"       # NER: a tag per word
    python onnx_inference.py --model model.int8.onnx BUNDLE "..."            # the int8 model

Prints one JSON object per input text: {"text", "label", "score"} for a sequence classifier,
{"text", "words", "tags"} for a token classifier (words split on whitespace, each word tagged by
its first sub-token, as in training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Bundle:
    def __init__(self, path: str | Path, model_file: str = "model.onnx", max_length: int = 128):
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        self.id2label = {int(k): v for k, v in config["id2label"].items()}
        self.token_level = any(a.endswith("ForTokenClassification") for a in config.get("architectures", []))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id") or 0)
        # onnxruntime's fused SkipLayerNormalization is slower on CPU than the two ops it replaces (the latency
        # in validation.md was measured without it)
        self.session = ort.InferenceSession(
            str(path / model_file), providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def logits(self, encodings) -> np.ndarray:
        feeds = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feeds = {k: np.array(v, dtype=np.int64) for k, v in feeds.items() if k in self.inputs}
        return self.session.run(["logits"], feeds)[0]

    def __call__(self, texts: list[str]) -> list[dict]:
        if not self.token_level:
            logits = self.logits(self.tokenizer.encode_batch(texts))
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            return [
                {"text": t, "label": self.id2label[int(p.argmax())], "score": round(float(p.max()), 4)}
                for t, p in zip(texts, probs)
            ]
        words = [t.split() for t in texts]
        encodings = self.tokenizer.encode_batch(words, is_pretokenized=True)
        out = []
        for text, ws, enc, row in zip(texts, words, encodings, self.logits(encodings).argmax(-1)):
            tags, seen = {}, set()
            for position, w in enumerate(enc.word_ids):
                if w is not None and w not in seen:  # first sub-token of each word
                    seen.add(w)
                    tags[w] = self.id2label[int(row[position])]
            out.append({"text": text, "words": ws, "tags": [tags.get(i, "O") for i in range(len(ws))]})
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="bundle dir (artifacts/<name>/<version>)")
    p.add_argument("texts", nargs="+")
    p.add_argument("--model", default="model.onnx", help="model file in the bundle (model.int8.onnx: int8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (longer ones are cut)")
    args = p.parse_args(argv)
    for result in Bundle(args.bundle, args.model, args.max_length)(args.texts):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
