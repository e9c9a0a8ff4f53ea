"""`hpcnlp finetune`: sequence classification or token classification (NER) on labelled data.

config -> tokenizer -> read + check every data file (refuse before writing anything) -> model with
the label set in its config.json -> freeze -> Trainer (dynamic padding, length-grouped batches,
early stopping, best checkpoint) -> every eval set scored apart -> predictions.jsonl on the test set
-> model, metrics.json, report.md, loss.png, confusion matrices in output_dir.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hpcnlp.config import ConfigError, FinetuneConfig, FreezeConfig, Problem, dump_config
from hpcnlp.data import classification, ner
from hpcnlp.data.labels import label_maps
from hpcnlp.metrics import (classification_compute_metrics, classification_metrics, headline,
                            ner_compute_metrics, ner_metrics, plot_confusion_matrix)
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, plot_loss, write_report
from hpcnlp.runtime import env, preempt
from hpcnlp.runtime.checkpoints import resume_target
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text
from hpcnlp.tasks import auto_model_class
from hpcnlp.train.callbacks import ThroughputCallback, peak_memory_mb
from hpcnlp.train.replicas import replicas_identical

log = logging.getLogger(__name__)
IS_NER = "token-classification"


# --- model ------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, label_names: list[str]):
    id2label, label2id = label_maps(label_names)
    # ignore_mismatched_sizes: a model fine-tuned before on another label set gets a fresh head.
    return auto_model_class(cfg.task).from_pretrained(
        resolve_model_path(cfg.model_name_or_path), num_labels=len(label_names), id2label=id2label,
        label2id=label2id, ignore_mismatched_sizes=True, trust_remote_code=cfg.trust_remote_code)


def encoder_layers(base):
    """The list of transformer blocks, wherever the architecture keeps it."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        node = base
        for attr in path.split("."):
            node = getattr(node, attr, None)
        if node is not None:
            return list(node)
    raise ValueError(f"freeze.layers: cannot find the encoder layers of {type(base).__name__}")


def freeze(model, f: FreezeConfig) -> dict:
    """Turn off gradients as configured; the head (everything outside the base model) always trains."""
    base = model.base_model
    frozen = []
    if f.all_but_head:
        frozen = [base]
    else:
        if f.embeddings:
            frozen.append(base.embeddings)
        frozen += encoder_layers(base)[:f.layers]
    for module in frozen:
        module.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**f.model_dump(), "trainable_parameters": trainable,
            "total_parameters": sum(p.numel() for p in model.parameters())}


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
            raise ConfigError("class_weights", [Problem(key=f"class_weights.{u}", message="not a label of this data",
                                                        fix=f"use labels from {label_names}") for u in unknown])
        weights = [float(spec.get(n, 1.0)) for n in label_names]
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(weights):
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               weight=weights.to(logits.device), ignore_index=ner.IGNORE)

    return loss


def _trainer_class():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        def _get_eval_sampler(self, eval_dataset):
            # Eval sets are stored longest first (data readers), so batches in order already hold
            # similar lengths, and predictions come back in dataset order (a length-grouped sampler
            # would shuffle them away from their rows).
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    return FinetuneTrainer


# --- evaluation -------------------------------------------------------------------------------
def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def score_classification(output, ds, label_names):
    probs = _softmax(output.predictions)
    pred = probs.argmax(-1)
    metrics = classification_metrics(list(ds["labels"]), list(pred), label_names)
    rows = []
    for i, ex in enumerate(ds):
        row = {"where": ex["where"], "text": ex["text"]}
        if "text_pair" in ex:
            row["text_pair"] = ex["text_pair"]
        rows.append({**row, "gold": label_names[ex["labels"]], "predicted": label_names[pred[i]],
                     "score": round(float(probs[i, pred[i]]), 4)})
    return metrics, rows


def score_ner(output, ds, label_names, strict_iob2: bool):
    """Word-level: each word's prediction is its first sub-token's; a word with no sub-token left
    (truncated) is predicted O, so it still counts against recall."""
    probs = _softmax(output.predictions)
    gold, pred, rows = [], [], []
    for i, ex in enumerate(ds):
        first = {}
        for pos, w in enumerate(ex["word_ids"]):
            if w >= 0 and w not in first:
                first[w] = pos
        ids = [int(probs[i, first[w]].argmax()) if w in first else 0 for w in range(len(ex["tokens"]))]
        tags = [label_names[k] if w in first else "O" for w, k in enumerate(ids)]
        scores = [round(float(probs[i, first[w], k]), 4) if w in first else None for w, k in enumerate(ids)]
        gold.append(ex["tags"])
        pred.append(tags)
        rows.append({"where": ex["where"], "text": " ".join(ex["tokens"]), "tokens": ex["tokens"],
                     "gold": ex["tags"], "predicted": tags, "score": scores})
    return ner_metrics(gold, pred, strict_iob2), rows


def evaluate_all(trainer, cfg: FinetuneConfig, data, out: Path) -> tuple[dict, list[str]]:
    """Score every eval set apart; write predictions.jsonl (test) and confusion matrices (classification)."""
    results, images = {}, []
    for name, ds in data.splits.items():
        if name == "train":
            continue
        output = trainer.predict(ds, metric_key_prefix=name)
        if cfg.task == IS_NER:
            metrics, rows = score_ner(output, ds, data.label_names, cfg.data.strict_iob2)
        else:
            metrics, rows = score_classification(output, ds, data.label_names)
        metrics["loss"] = output.metrics.get(f"{name}_loss")
        metrics["file"] = data.files[name]
        results[name] = metrics
        if not trainer.is_world_process_zero():
            continue
        if "confusion_matrix" in metrics:
            atomic_write_json(out / f"confusion_matrix.{name}.json", metrics["confusion_matrix"])
            images.append(plot_confusion_matrix(metrics["confusion_matrix"], out / f"confusion_matrix.{name}.png",
                                                f"{name}: gold vs predicted").name)
        if name == "test":
            rows.sort(key=lambda r: int(r["where"].split()[1]))  # back to file order
            atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return results, images


def _tables(results: dict, task: str) -> list[tuple[str, str]]:
    overall = [{"set": name, **headline(m), "loss": m.get("loss")} for name, m in results.items()]
    columns = ["set", "f1", "precision", "recall", "token_accuracy" if task == IS_NER else "accuracy", "loss"]
    sections = [("Scores per evaluation set", markdown_table(overall, columns))]
    key = "per_type" if task == IS_NER else "per_class"
    for name, m in results.items():
        rows = [{"label": label, **v} for label, v in m[key].items()]
        sections.append((f"{name}: per {'entity type' if task == IS_NER else 'class'}",
                         markdown_table(rows, ["label", "precision", "recall", "f1", "support"])))
    return sections


# --- the job ----------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> int:
    import torch
    from transformers import (DataCollatorForTokenClassification, DataCollatorWithPadding, EarlyStoppingCallback,
                              PrinterCallback, set_seed)

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    reader = ner if cfg.task == IS_NER else classification
    # Every row of every file is checked here, before anything is written (a ConfigError: cli reports it).
    data = reader.load(cfg.data, tokenizer)
    weights = None
    if cfg.class_weights:
        train_labels = [x for row in data.splits["train"]["labels"] for x in np.atleast_1d(row) if x != ner.IGNORE]
        weights = class_weight_vector(cfg.class_weights, data.label_names, train_labels)
    log.info("labels (%d): %s; %s", len(data.label_names), data.label_names,
             {k: v.get("examples", v.get("sentences")) for k, v in data.stats.items()})

    t = cfg.training
    args = t.to_training_arguments(
        cfg.output_dir, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        eval_steps=t.eval_steps or t.save_steps, load_best_model_at_end=t.load_best_model_at_end
        and t.eval_strategy != "no", dataloader_pin_memory=torch.cuda.is_available())
    set_seed(args.seed)  # before the head is initialised
    preempt.install_handlers()

    model = build_model(cfg, data.label_names)
    frozen = freeze(model, cfg.freeze)
    log.info("trainable parameters: %s of %s", f"{frozen['trainable_parameters']:,}",
             f"{frozen['total_parameters']:,}")
    if cfg.task == IS_NER:
        collator = DataCollatorForTokenClassification(tokenizer)  # pads labels with -100
        compute_metrics = ner_compute_metrics(data.label_names, cfg.data.strict_iob2)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = classification_compute_metrics(data.label_names)
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    throughput = ThroughputCallback(samples_per_step)
    callbacks = [throughput, preempt.PreemptionCallback(cfg.output_dir)]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=data.splits["train"], eval_dataset=data.splits["validation"],
        data_collator=collator, processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
        compute_loss_func=weighted_cross_entropy(weights) if weights is not None else None)
    trainer.remove_callback(PrinterCallback)  # ThroughputCallback logs one readable line instead

    checkpoint = resume_target(cfg.resume, out, restarted=env.slurm_restart_count() > 0)
    log.info("resuming from %s", checkpoint) if checkpoint else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if preempt.requested():
        return preempt.requeue_exit(trainer.state.global_step)

    replicas = replicas_identical(model)  # False: ranks drifted apart (logged); save nothing
    if replicas is False:
        return 1

    trainer.save_model(cfg.output_dir)  # best model (load_best_model_at_end), config.json with id2label
    results, images = evaluate_all(trainer, cfg, data, out)
    if not trainer.is_world_process_zero():
        return 0
    train_seconds = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen - throughput.start_tokens
    metrics = {
        "job": "finetune",
        "task": cfg.task,
        "model_name_or_path": cfg.model_name_or_path,
        "labels": data.label_names,
        "eval": results,
        "data": data.stats,
        "freeze": frozen,
        "class_weights": weights.tolist() if weights is not None else None,
        "train_loss": result.metrics.get("train_loss"),
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "resumed_from": checkpoint,
        "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_runtime_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "world_size": args.world_size,
        "replicas_identical": replicas,  # null: one process
        **peak_memory_mb(),
        "slurm_job_id": env.slurm_job_id(),
    }
    atomic_write_text(out / "config.resolved.yaml", dump_config(cfg))
    plot = plot_loss(trainer.state.log_history, out / "loss.png", f"fine-tuning ({cfg.task}): {cfg.model_name_or_path}")
    sections = _tables(results, cfg.task) + [
        ("Training", f"{metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}, "
                     f"{metrics['samples_per_second']} samples/s, {metrics['tokens_per_second']} tokens/s; "
                     f"trainable parameters {frozen['trainable_parameters']:,} of {frozen['total_parameters']:,}; "
                     f"best checkpoint {metrics['best_checkpoint']}"),
    ]
    write_report(out, f"Fine-tuning: {cfg.task}", metrics, sections, images=(["loss.png"] if plot else []) + images)
    summary = ", ".join(f"{k} f1 {v['f1']:.3f}" for k, v in results.items())
    log.info("%s; model, metrics.json and report.md in %s", summary, out)
    return 0
