"""Tasks: what a saved model does, its labelled data and its metric. One module per task here, each
with a `TASK` (hpcnlp.tasks.base.Task); the registry finds them, nothing else lists them.

The task of a saved model is read from its config.json (`architectures`), never configured twice.
Data are read with the task's reader, with the label set forced to the model's own id2label, so label
ids mean the same in the data, the PyTorch model and the ONNX file. Below the registry: running a
model over data (PyTorch and onnxruntime share one runner signature), shared by the jobs and ship/.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import pkgutil
import platform
import time
from pathlib import Path

import numpy as np

from hpcnlp.data.labels import IGNORE
from hpcnlp.models import ModelNotFound, resolve_model_path
from hpcnlp.tasks.base import Task


@functools.cache
def registry() -> dict[str, Task]:
    found = {}
    for info in pkgutil.iter_modules(__path__, f"{__name__}."):
        task = getattr(importlib.import_module(info.name), "TASK", None)
        if isinstance(task, Task):
            found[task.name] = task
    return found


def get(name: str) -> Task:
    return registry()[name]


def names(labelled: bool | None = None) -> list[str]:
    """Task names; labelled=True: those fine-tuned on labelled data (finetune's `task:` choices)."""
    return sorted(n for n, t in registry().items() if labelled is None or t.labelled == labelled)


def labelled(name: str | None) -> bool:
    """A task fine-tuned on labelled data (distill, prune, static int8 and validate's gate take it)."""
    return name in registry() and registry()[name].labelled


def task_of(model_dir: str | Path) -> str:
    """The name of a saved model's task (get(name) is the Task)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for arch in config.get("architectures") or []:
        for task in registry().values():
            if arch.endswith(task.architecture):
                return task.name
    raise ValueError(
        f"{model_dir}/config.json: architectures {config.get('architectures')} is none of the "
        f"tasks' ({', '.join(t.architecture for t in registry().values())})"
    )


def model_task(name_or_path: str) -> str | None:
    """The task of a saved model (alias or dir), None when it cannot be told (yet)."""
    try:
        return task_of(resolve_model_path(name_or_path))
    except (ModelNotFound, ValueError, OSError):
        return None


def auto_model_class(task: str):
    import transformers

    return getattr(transformers, get(task).auto_model)


def label_names(model_dir: str | Path) -> list[str]:
    id2label = json.loads((Path(model_dir) / "config.json").read_text()).get("id2label", {})
    return [id2label[str(i)] for i in range(len(id2label))]


def load_data(task: str, data, tokenizer, model_dir: str | Path):
    """Tokenized splits (train, validation, test...) labelled with the model's own label ids."""
    data = data.model_copy(update={"label_names": label_names(model_dir)})
    return get(task).reader.load(data, tokenizer)


def data_problems(task: str, data, pending=()) -> list:
    """The task's data files: exist, fit its formats, have its columns (hpcnlp.data.labels)."""
    from hpcnlp.data.labels import data_file_problems

    if task not in registry():
        return []  # an unknown task is the config's own problem (finetune: `task`)
    t = get(task)
    return data_file_problems(t.name, t.data_formats, t.data_columns(data), data, pending)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def batches(ds, batch_size: int, pad_id: int = 0, pad_to: int | None = None):
    """(inputs as int64 numpy arrays, labels or None) per batch, padded to the longest row (or pad_to)."""
    names = [n for n in MODEL_INPUTS if n in ds.column_names]
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        width = pad_to or max(len(x) for x in rows["input_ids"])
        inputs = {}
        for name in names:
            fill = pad_id if name == "input_ids" else 0
            inputs[name] = np.array([x[:width] + [fill] * (width - len(x[:width])) for x in rows[name]], np.int64)
        labels = rows.get("labels")
        if labels is not None and isinstance(labels[0], list):  # token labels: pad with IGNORE
            labels = np.array([x[:width] + [IGNORE] * (width - len(x[:width])) for x in labels], np.int64)
        elif labels is not None:
            labels = np.array(labels, np.int64)
        yield inputs, labels


def metrics(task: str, logits: list[np.ndarray], labels: list[np.ndarray], names: list[str]) -> dict:
    """The fine-tuning job's headline metrics (same code, same names), over all batches."""
    return get(task).batch_metrics(logits, labels, names)


# --- running a model over data: PyTorch and onnxruntime share one call signature -------------------
# A runner maps numpy inputs {input_ids, attention_mask, ...} to numpy outputs {"logits": ...}.
METRIC_BATCH = 32


def torch_runner(model):
    import torch

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(model.device) for k, v in inputs.items()})
            return {"logits": out.logits.float().cpu().numpy()}

    return run


def evaluate(runner, ds, task: str, names: list[str], pad_id: int) -> dict:
    logits, labels = [], []
    for inputs, gold in batches(ds, METRIC_BATCH, pad_id):
        logits.append(runner(inputs)["logits"])
        labels.append(gold)
    return metrics(task, logits, labels, names)


def latency(runner, ds, batch_size: int, cfg, pad_id: int) -> dict:
    rows = ds.select([i % len(ds) for i in range(batch_size)])  # real text, padded to seq_length
    inputs, _ = next(batches(rows, batch_size, pad_id, pad_to=cfg.seq_length))
    for _ in range(cfg.warmup):
        runner(inputs)
    times = []
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        runner(inputs)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "samples_per_second": round(batch_size * 1000 / float(np.mean(times)), 1),
    }


# The x86 extensions onnxruntime's int8 and bf16 kernels pick by: the same model runs at another speed
# (int8: even another accuracy, see export's quantize presets) without them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """The CPU latency is measured on: model name and which of ISA_FLAGS it has (/proc/cpuinfo)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's; a node has one model
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "flags": {flag: flag in flags for flag in ISA_FLAGS},
    }


def cpu_text(info: dict) -> str:
    return f"{info['model']} (" + ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in info["flags"].items()) + ")"
