"""What one task is (`Task`): everything that differs between sequence classification, token
classification and fill-mask, in one object per task module (hpcnlp/tasks/<task>.py).

A job never compares task names: it asks the task (`get(name)`, `task_of(model_dir)`) for its model
class, data reader, collator, metrics and scoring. docs/architecture.md: adding a task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str  # finetune's `task:`, the bundle manifest's `task`
    architecture: str  # suffix of config.json `architectures` that marks a saved model of this task
    auto_model: str  # the transformers Auto class that loads it
    optimum_task: str  # Optimum's exporter task
    # The one metric the task is judged by (distill/prune retention, validate's int8 drop); None: the
    # task has no labelled data (fill-mask: export only, no fine-tuning, no gate).
    primary_metric: str | None = None
    token_level: bool = False  # one label per token: outputs compared at real (unpadded) tokens
    data_formats: tuple[str, ...] = ()  # labelled data formats its reader takes
    peft_task_type: str | None = None  # peft.TaskType name for LoRA
    reader: Any = None  # module with load(data, tokenizer) -> Labelled (hpcnlp.data.classification / ner)
    data_columns: Callable[[Any], dict] = lambda data: {}  # data config -> {key: column the files must have}
    collator: Callable[[Any], Any] | None = None  # tokenizer -> the Trainer's data collator
    compute_metrics: Callable[[list[str], Any], Callable] | None = None  # (label names, data cfg) -> Trainer's
    # (PredictionOutput, eval split, label names, data cfg) -> (metrics, prediction rows for predictions.jsonl)
    score: Callable[[Any, Any, list[str], Any], tuple[dict, list[dict]]] | None = None
    # (logits per batch, labels per batch, label names) -> headline metrics of a runner (PyTorch or ONNX)
    batch_metrics: Callable[[list, list, list[str]], dict] | None = None
    metric_names: tuple[str, ...] = ()  # what its evaluations log (metric_for_best_model may name one, or loss)
    accuracy_key: str = "accuracy"  # the accuracy column of reports (token tasks: token_accuracy)
    per_label_key: str = "per_class"  # metrics key of the per-label table ...
    per_label_title: str = "class"  # ... and what a label is called in it
    encode: Callable[[Any, str, str | None, int], dict] | None = None  # (tokenizer, text, pair, max_len) -> enc
    example_text: str = "a text to classify"  # the model card's usage line

    @property
    def labelled(self) -> bool:
        """Fine-tuned on labelled data, so distill, prune, static int8 and validate's gate take it."""
        return self.primary_metric is not None
