"""`hpcnlp finetune`: sequence classification or token classification (NER) on labelled data.

config -> tokenizer -> read + check every data file (refuse before writing anything) -> model with
the label set in its config.json -> freeze -> Trainer (dynamic padding, length-grouped batches,
early stopping, best checkpoint) -> every eval set scored apart -> predictions.jsonl on the test set
-> model, metrics.json, report.md, loss.png, confusion matrices in output_dir.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from hpcnlp import checks, tasks
from hpcnlp.config import (
    AdapterConfig,
    ConfigError,
    FinetuneDataConfig,
    Problem,
    Section,
    TrainingConfig,
    TrainingJobConfig,
)
from hpcnlp.data.labels import IGNORE, label_maps
from hpcnlp.metrics import headline, plot_confusion_matrix
from hpcnlp.models import encoder_layers, load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text, is_inside
from hpcnlp.spec import JobSpec
from hpcnlp.tasks import auto_model_class
from hpcnlp.train import adapters

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class FreezeConfig(Section):
    """Which pretrained weights stay fixed; the task head always trains."""

    embeddings: bool = False
    layers: int = Field(0, ge=0)  # the first N encoder layers
    all_but_head: bool = False  # the whole encoder: only the classifier trains


class FinetuneTrainingConfig(TrainingConfig):
    """TrainingConfig with fine-tuning defaults: length-grouped batches, best checkpoint kept."""

    group_by_length: bool = True
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "f1"  # macro F1 (classification), entity F1 (NER); or accuracy, loss...
    greater_is_better: bool | None = None  # None: True unless the metric is a loss

    def problems(self) -> list[Problem]:
        out = super().problems()
        if self.load_best_model_at_end:
            if self.eval_strategy != self.save_strategy:
                out.append(
                    Problem(
                        key="training.save_strategy",
                        message=f"load_best_model_at_end needs "
                        f"save_strategy == eval_strategy (got {self.save_strategy} and "
                        f"{self.eval_strategy})",
                        fix="make them equal, or set training.load_best_model_at_end: false",
                    )
                )
            elif self.eval_strategy == "steps" and self.eval_steps and self.save_steps % self.eval_steps:
                out.append(
                    Problem(
                        key="training.save_steps",
                        message=f"save_steps {self.save_steps} is not a multiple of eval_steps {self.eval_steps}",
                        fix="make it a multiple",
                    )
                )
        return out


class FinetuneConfig(TrainingJobConfig):
    job: Literal["finetune"] = "finetune"
    task: str  # a labelled task of hpcnlp.tasks: sequence-classification, token-classification
    model_name_or_path: str = "minilm-l6"  # alias, local dir, or a `hpcnlp pretrain` output_dir
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    data: FinetuneDataConfig
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    adapter: AdapterConfig | None = None  # LoRA: the encoder stays frozen, low-rank updates + the head train
    class_weights: Literal["balanced"] | dict[str, float] | None = None  # loss weights per label
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    training: FinetuneTrainingConfig = Field(default_factory=FinetuneTrainingConfig)

    def best_metric_is_logged(self) -> bool:
        """metric_for_best_model names what the task's evaluations log (the Trainer finds out only at the
        first evaluation, after a whole epoch of training)."""
        name = self.training.metric_for_best_model
        if not name or not self.training.load_best_model_at_end and self.early_stopping_patience is None:
            return True
        return name.removeprefix("eval_") in (*tasks.get(self.task).metric_names, "loss")

    def problems(self) -> list[Problem]:
        out = self.training.problems()
        if self.task in tasks.names(labelled=True) and not self.best_metric_is_logged():
            names = [*tasks.get(self.task).metric_names, "loss"]
            out.append(
                Problem(
                    key="training.metric_for_best_model",
                    message=f"{self.training.metric_for_best_model!r} is not a metric {self.task} evaluations log",
                    fix=f"use one of {names} (eval_ prefix optional)",
                )
            )
        if self.task not in tasks.names(labelled=True):
            out.append(
                Problem(
                    key="task", message=f"unknown task {self.task!r}", fix=f"use one of {tasks.names(labelled=True)}"
                )
            )
        t = self.training
        if self.early_stopping_patience and (t.eval_strategy == "no" or not t.load_best_model_at_end):
            out.append(
                Problem(
                    key="early_stopping_patience",
                    message="early stopping needs evaluations and training.load_best_model_at_end",
                    fix="set training.eval_strategy to steps or "
                    "epoch and training.load_best_model_at_end: true, or drop early_stopping_patience",
                )
            )
        if self.adapter and self.freeze != FreezeConfig():
            out.append(
                Problem(
                    key="freeze",
                    message="adapter already freezes the encoder (only LoRA weights and the head train)",
                    fix="remove freeze:, or remove adapter:",
                )
            )
        names = self.data.label_names
        if names is not None and len(set(names)) != len(names):
            out.append(Problem(key="data.label_names", message="a label is listed twice", fix="list each once"))
        if isinstance(self.class_weights, dict) and names is not None:
            for label in sorted(set(self.class_weights) - set(names)):
                out.append(
                    Problem(key=f"class_weights.{label}", message="not in data.label_names", fix=f"use one of {names}")
                )
        return out


def model_config(cfg: FinetuneConfig) -> dict | None:
    """The sizes of the model trained (training.bf16: auto's probe)."""
    return checks.model_config(cfg.model_name_or_path)


def check(cfg: FinetuneConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.training(cfg.training, cfg.output_dir) + checks.resume(cfg)
    out += checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    out += checks.model("tokenizer_name_or_path", cfg.tokenizer_name_or_path, pending)
    out += tasks.data_problems(cfg.task, cfg.data, pending)
    out += checks.max_seq_length(cfg.data.max_seq_length, "model_name_or_path", cfg.model_name_or_path, pending)
    if cfg.freeze.layers and not is_inside(cfg.model_name_or_path, pending):
        config = checks.model_config(cfg.model_name_or_path) or {}
        n = config.get("num_hidden_layers", config.get("n_layers"))
        if n is not None and cfg.freeze.layers > n:
            out.append(
                Problem(
                    key="freeze.layers",
                    message=f"the model has {n} layers, cannot freeze {cfg.freeze.layers}",
                    fix=f"use 0..{n} (or freeze.all_but_head: true)",
                )
            )
    out += adapters.check(cfg.adapter, cfg.model_name_or_path, pending, cfg.trust_remote_code)
    out += checks.overlaps(
        cfg.output_dir,
        {
            "model_name_or_path": cfg.model_name_or_path,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
            **cfg.data.files(),
        },
    )
    return out + checks.output_dir(cfg, cfg.resume)


# --- model ------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, label_names: list[str]):
    id2label, label2id = label_maps(label_names)
    # ignore_mismatched_sizes: a model fine-tuned before on another label set gets a fresh head.
    return auto_model_class(cfg.task).from_pretrained(
        resolve_model_path(cfg.model_name_or_path),
        num_labels=len(label_names),
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=True,
        trust_remote_code=cfg.trust_remote_code,
    )


def freeze(model, f: FreezeConfig) -> dict:
    """Turn off gradients as configured; the head (everything outside the base model) always trains."""
    base = model.base_model
    frozen = []
    if f.all_but_head:
        frozen = [base]
    else:
        if f.embeddings:
            frozen.append(base.embeddings)
        parent, name = encoder_layers(model)
        frozen += list(getattr(parent, name))[: f.layers]
    for module in frozen:
        module.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        **f.model_dump(),
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


# --- loss with class weights ------------------------------------------------------------------
def class_weight_vector(spec, label_names: list[str], train_labels: list[int]):
    """'balanced' (n / (k * count), as scikit-learn) or {label: weight} (others 1.0) -> tensor."""
    import torch

    if spec == "balanced":
        counts = np.bincount(np.asarray(train_labels), minlength=len(label_names)).astype(float)
        present = counts > 0
        weights = np.ones(len(label_names))
        weights[present] = counts.sum() / (present.sum() * counts[present])
    else:
        unknown = sorted(set(spec) - set(label_names))
        if unknown:
            raise ConfigError(
                "class_weights",
                [
                    Problem(
                        key=f"class_weights.{u}",
                        message="not a label of this data",
                        fix=f"use labels from {label_names}",
                    )
                    for u in unknown
                ],
            )
        weights = [float(spec.get(n, 1.0)) for n in label_names]
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(weights):
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            labels.reshape(-1),
            weight=weights.to(logits.device),
            ignore_index=IGNORE,
        )

    return loss


def trainer_class():
    from torch.utils.data import SequentialSampler

    from hpcnlp.train.harness import ResumableTrainer

    class FinetuneTrainer(ResumableTrainer):
        def _get_eval_sampler(self, eval_dataset):
            # Eval sets are stored longest first (data readers), so batches in order already hold
            # similar lengths, and predictions come back in dataset order (a length-grouped sampler
            # would shuffle them away from their rows).
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    return FinetuneTrainer


# --- evaluation -------------------------------------------------------------------------------
def evaluate_all(trainer, cfg: FinetuneConfig, data, out: Path) -> tuple[dict, list[str]]:
    """Score every eval set apart; write predictions.jsonl (test) and confusion matrices (classification)."""
    results, images = {}, []
    for name, ds in data.splits.items():
        if name == "train":
            continue
        output = trainer.predict(ds, metric_key_prefix=name)
        metrics, rows = tasks.get(cfg.task).score(output, ds, data.label_names, cfg.data)
        metrics["loss"] = output.metrics.get(f"{name}_loss")
        metrics["file"] = data.files[name]
        results[name] = metrics
        if not trainer.is_world_process_zero():
            continue
        if "confusion_matrix" in metrics:
            atomic_write_json(out / f"confusion_matrix.{name}.json", metrics["confusion_matrix"])
            images.append(
                plot_confusion_matrix(
                    metrics["confusion_matrix"], out / f"confusion_matrix.{name}.png", f"{name}: gold vs predicted"
                ).name
            )
        if name == "test":
            rows.sort(key=lambda r: int(r["where"].split()[1]))  # back to file order
            atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return results, images


def _tables(results: dict, task: tasks.Task) -> list[tuple[str, str]]:
    overall = [{"set": name, **headline(m), "loss": m.get("loss")} for name, m in results.items()]
    columns = ["set", "f1", "precision", "recall", task.accuracy_key, "loss"]
    sections = [("Scores per evaluation set", markdown_table(overall, columns))]
    for name, m in results.items():
        rows = [{"label": label, **v} for label, v in m[task.per_label_key].items()]
        sections.append(
            (
                f"{name}: per {task.per_label_title}",
                markdown_table(rows, ["label", "precision", "recall", "f1", "support"]),
            )
        )
    return sections


# --- the job ----------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> int:
    from transformers import EarlyStoppingCallback

    from hpcnlp.train.harness import TrainingRun

    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    task = tasks.get(cfg.task)
    # Every row of every file is checked here, before anything is written (a ConfigError: cli reports it).
    data = task.reader.load(cfg.data, tokenizer)
    weights = None
    if cfg.class_weights:
        train_labels = [x for row in data.splits["train"]["labels"] for x in np.atleast_1d(row) if x != IGNORE]
        weights = class_weight_vector(cfg.class_weights, data.label_names, train_labels)
    log.info(
        "labels (%d): %s; %s",
        len(data.label_names),
        data.label_names,
        {k: v.get("examples", v.get("sentences")) for k, v in data.stats.items()},
    )

    t = cfg.training
    run = TrainingRun(
        cfg, model_config(cfg), load_best_model_at_end=t.load_best_model_at_end and t.eval_strategy != "no"
    )
    model = build_model(cfg, data.label_names)
    if cfg.adapter:
        model = adapters.wrap(model, cfg.adapter, task.peft_task_type)
        frozen = {"adapter": cfg.adapter.model_dump(), **adapters.parameter_counts(model)}
    else:
        frozen = freeze(model, cfg.freeze)
    log.info("trainable parameters: %s of %s", f"{frozen['trainable_parameters']:,}", f"{frozen['total_parameters']:,}")
    collator = task.collator(tokenizer)
    compute_metrics = task.compute_metrics(data.label_names, cfg.data)
    callbacks = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    trainer = run.trainer(
        trainer_class(),
        callbacks,
        model=model,
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        compute_loss_func=weighted_cross_entropy(weights) if weights is not None else None,
    )

    code = run.train()
    if code is not None:
        return code
    run.save()  # best model (load_best_model_at_end), config.json with id2label
    results, images = evaluate_all(trainer, cfg, data, out)
    if not run.is_main:
        return 0
    metrics = {
        "job": "finetune",
        "task": cfg.task,
        "model_name_or_path": cfg.model_name_or_path,
        "labels": data.label_names,
        "eval": results,
        "data": data.stats,
        "freeze": frozen,
        "class_weights": weights.tolist() if weights is not None else None,
        **run.metrics(),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
    }
    sections = _tables(results, task) + [
        (
            "Training",
            f"{metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}, "
            f"{metrics['samples_per_second']} samples/s, {metrics['tokens_per_second']} tokens/s; "
            f"trainable parameters {frozen['trainable_parameters']:,} of {frozen['total_parameters']:,}; "
            f"best checkpoint {metrics['best_checkpoint']}",
        ),
    ]
    run.write_report(
        f"Fine-tuning: {cfg.task}",
        metrics,
        sections,
        images,
        plot_title=f"fine-tuning ({cfg.task}): {cfg.model_name_or_path}",
    )
    summary = ", ".join(f"{k} f1 {v['f1']:.3f}" for k, v in results.items())
    log.info("%s; model, metrics.json and report.md in %s", summary, out)
    return 0


def summary_row(cfg: FinetuneConfig) -> dict:
    out = Path(cfg.output_dir)
    ev = json.loads((out / "metrics.json").read_text())["eval"]["validation"]
    return {
        "metric": "validation " + ", ".join(f"{k} {ev[k]:.3f}" for k in ("accuracy", "f1") if k in ev),
        "size": mb(out / "model.safetensors"),
    }


SPEC = JobSpec(
    name="finetune",
    order=30,
    resumable=True,
    help="fine-tune for sequence classification or NER; scores, predictions",
    config=FinetuneConfig,
    check=check,
    run=run,
    summary_row=summary_row,
    model_config=model_config,
    example_config="jobs/finetune-sentiment.yaml",
)
