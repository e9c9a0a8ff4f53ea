"""Fine-tuning recipes on Rotten Tomatoes sentences (the shipped sample), batch 16, same steps.

- hpcnlp: the finetune job's building blocks (jobs/finetune-sentiment.yaml, its data reader, model,
  collator and Trainer): dynamic padding, length-grouped batches.
- seed: padding="max_length" to 512 (the seeds' recipe), stock Trainer.
- run_glue: HF `run_glue.py` default, pad every sentence to 128, stock Trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.timing import CountingCollator, StepClock, peak_rss_mb, steady_rates
from hpcnlp.data import classification
from hpcnlp.jobs import finetune as job
from hpcnlp.jobs import load_config
from hpcnlp.models import load_tokenizer
from hpcnlp.train.harness import training_arguments

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "finetune-sentiment.yaml"
EVAL_ROWS = 200  # validation rows every recipe is scored on


def _config(work: str, steps: int, batch: int, bf16: bool = False):
    overrides = [
        f"training.bf16={str(bf16).lower()}",
        f"output_dir={work}/finetune",
        f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch}",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "training.load_best_model_at_end=false",
        "early_stopping_patience=null",
        f"training.logging_steps={steps}",
        "overwrite=true",
    ]
    return load_config(CONFIG, overrides, expect_job="finetune")


@torch.no_grad()
def _accuracy(model, tokenizer, ds, bf16: bool = False) -> dict:
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer)
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for i in range(0, len(ds), 32):
        rows = [
            {k: ds[j][k] for k in ("input_ids", "attention_mask", "labels")} for j in range(i, min(i + 32, len(ds)))
        ]
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, enabled=bf16):
            out = model(**pad(rows))
        labels = torch.tensor([r["labels"] for r in rows])
        correct += int((out.logits.argmax(-1) == labels).sum())
        loss += out.loss.item() * len(rows)
        n += len(rows)
    return {"eval_accuracy": round(correct / n, 4), "eval_loss": round(loss / n, 4)}


def _train(model, trainer_class, args, train, collator, tokenizer, warmup, eval_ds, padding) -> dict:
    counts, clock = CountingCollator(collator, tokenizer.pad_token_id), StepClock()
    trainer = trainer_class(
        model=model, args=args, train_dataset=train, data_collator=counts, processing_class=tokenizer, callbacks=[clock]
    )
    trainer.train()
    return {
        **steady_rates(clock, counts, warmup),
        **_accuracy(model, tokenizer, eval_ds, args.bf16),
        "dtype": "bf16" if args.bf16 else "fp32",
        "steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size,
        "padding": padding,
        "group_by_length": args.group_by_length,
        "peak_rss_mb": peak_rss_mb(),
    }


def hpcnlp(work: str, steps: int, batch: int, warmup: int, bf16: bool = False) -> dict:
    """The finetune job's path; bf16: the Trainer's own bf16 autocast (`training.bf16: true`)."""
    from transformers import DataCollatorWithPadding, set_seed

    cfg = _config(work, steps, batch, bf16)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = classification.load(cfg.data, tokenizer)
    args = training_arguments(cfg.training, cfg.output_dir, dataloader_pin_memory=False)
    set_seed(args.seed)
    model = job.build_model(cfg, data.label_names)
    eval_ds = data.splits["validation"].select(range(EVAL_ROWS))
    return _train(
        model,
        job.trainer_class(),
        args,
        data.splits["train"],
        DataCollatorWithPadding(tokenizer),
        tokenizer,
        warmup,
        eval_ds,
        "dynamic",
    )


def padded(work: str, steps: int, batch: int, warmup: int, max_length: int) -> dict:
    """The seeds' recipe (max_length 512) or run_glue's default (128): every row padded to max_length."""
    from transformers import AutoModelForSequenceClassification, Trainer, default_data_collator, set_seed

    from hpcnlp.models import resolve_model_path

    cfg = _config(work, steps, batch)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = classification.load(cfg.data, tokenizer)  # its labels and eval rows; the text is re-tokenized
    train = (
        data.splits["train"]
        .select_columns(["text", "labels"])
        .map(
            lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )
    )
    args = training_arguments(cfg.training, cfg.output_dir, dataloader_pin_memory=False, group_by_length=False)
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(cfg.model_name_or_path), num_labels=len(data.label_names)
    )
    eval_ds = data.splits["validation"].select(range(EVAL_ROWS))
    return _train(
        model, Trainer, args, train, default_data_collator, tokenizer, warmup, eval_ds, f"max_length {max_length}"
    )
