"""The measuring side of the gate: every staged ONNX model against the PyTorch model it was exported
from, on real eval data. Parity (per output: max abs diff, argmax agreement) on N eval examples, the task
metrics on every eval set, the edge cases (hpcnlp.ship.edge_cases), latency, the CPU. The judging is
hpcnlp.ship.gate's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from hpcnlp import tasks
from hpcnlp.ship.edge_cases import edge_cases, edge_results, run_edge_cases
from hpcnlp.ship.onnx import ort_runner, ort_session, providers
from hpcnlp.tasks import METRIC_BATCH, auto_model_class, batches, cpu, label_names, latency, metrics, torch_runner

log = logging.getLogger(__name__)

PARITY_BATCH = 8


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


@dataclass
class Predictions:
    """A runner's logits on an eval set, batch by batch, with gold labels and the positions compared
    (every example; token tasks: every real token)."""

    logits: list
    labels: list
    keep: list

    def metrics(self, task: str, names: list[str]) -> dict:
        return metrics(task, self.logits, self.labels, names)

    def agreement(self, other: Predictions) -> float:
        same = sum(
            int((a.argmax(-1) == b.argmax(-1))[k].sum()) for a, b, k in zip(self.logits, other.logits, self.keep)
        )
        return same / sum(int(k.sum()) for k in self.keep)


def predict(runner, ds, pad_id: int, token_level: bool) -> Predictions:
    out = Predictions([], [], [])
    for inputs, gold in batches(ds, METRIC_BATCH, pad_id):
        out.logits.append(runner(inputs)["logits"])
        out.labels.append(gold)
        out.keep.append(inputs["attention_mask"].astype(bool) if token_level else np.ones(len(gold), bool))
    return out


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
    runner: Callable | None = None  # the PyTorch model's (hpcnlp.tasks.torch_runner)

    @property
    def token_level(self) -> bool:
        return tasks.get(self.task).token_level

    @cached_property
    def metrics(self) -> dict:
        return self.predictions.metrics(self.task, self.names)

    def score(self, runner, ds) -> dict:
        """The task metrics of another runner on an eval set."""
        return predict(runner, ds, self.pad, self.token_level).metrics(self.task, self.names)


def reference(cfg, model_dir: str, task: str, tokenizer, eval_ds) -> Reference:
    """The PyTorch model's predictions on the eval set and its outputs on the edge cases. cfg: validate's
    config (num_examples: the parity sample; data: how the edge cases are tokenized)."""
    runner = torch_runner(auto_model_class(task).from_pretrained(model_dir).eval())
    pad = tokenizer.pad_token_id
    sample = eval_ds.select(range(min(cfg.num_examples, len(eval_ds))))
    cases = edge_cases(tokenizer, cfg.data, task)
    return Reference(
        task,
        label_names(model_dir),
        pad,
        eval_ds,
        sample,
        cases,
        predictions=predict(runner, eval_ds, pad, tasks.get(task).token_level),
        edge_outputs=run_edge_cases(runner, cases),
        runner=runner,
    )


def measure(cfg, staging: Path, ref: Reference, data, int8: dict | None, threads: int) -> dict:
    """validation.json but the verdict: the staged model.onnx (and model.int8.onnx, where one is kept) vs
    the reference: parity on the sample, task metrics on every eval set (extra ones and the test file
    reported, not gated), edge cases, latency, the CPU; `int8`: the recipe search's record. cfg: validate's
    config (data.extra_eval_files, latency)."""
    runners = {"pytorch": ref.runner, "onnx_fp32": ort_runner(ort_session(staging / "model.onnx", threads))}
    if (staging / "model.int8.onnx").is_file():
        runners["onnx_int8"] = ort_runner(ort_session(staging / "model.int8.onnx", threads))
    eval_ds, pad = ref.eval_ds, ref.pad
    results = {
        "task": ref.task,
        "eval_file": data.files["validation"],
        "eval_examples": len(eval_ds),
        "parity_examples": len(ref.sample),
        "threads": threads,
        "providers": providers(),
        "parity": {
            k: parity(runners["pytorch"], r, ref.sample, pad, ref.token_level)
            for k, r in runners.items()
            if k != "pytorch"
        },
        "metrics": {k: ref.metrics if k == "pytorch" else ref.score(r, eval_ds) for k, r in runners.items()},
    }
    log.info("parity %s", {k: (v["max_abs_diff"], v["argmax_agreement"]) for k, v in results["parity"].items()})
    if int8:
        results["int8"] = int8
    results["edge_cases"] = edge_results(runners, ref.cases, ref.edge_outputs)
    results["extra_eval"] = {
        name: {
            "file": data.files[name],
            "examples": len(data.splits[name]),
            "metrics": {k: ref.score(r, data.splits[name]) for k, r in runners.items()},
        }
        for name in cfg.data.extra_eval_files
    }  # reported, not gated
    results["latency"] = {
        k: {str(b): latency(r, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes}
        for k, r in runners.items()
    }
    results["cpu"] = cpu()
    if "test" in data.splits:  # held-out data, reported beside the validation file's; the gate stays on that
        results.update(
            test_file=data.files["test"],
            test_examples=len(data.splits["test"]),
            test_metrics={k: ref.score(r, data.splits["test"]) for k, r in runners.items()},
        )
    return results
