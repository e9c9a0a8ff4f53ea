"""Fine-tuning quality on the full public data (a benchmark, not a test; hours of CPU on 2 cores).

    python -m bench.finetune_quality [freeze] [ner] [pipeline] [--max-train-samples N] [--epochs E]

- freeze: Rotten Tomatoes (data/full, split by movie), the packaged MiniLM-L6, no freezing / the
  first 5 of 6 layers frozen / all but the head (seed 002's bert-base: 0.85 / 0.80 / 0.63 F1).
- ner: WNUT-2016 Twitter NER, full train split, scored on the held-out test split (entity F1 overall
  and per type).
- pipeline: `hpcnlp pretrain` on the Rotten Tomatoes *training* snippets (MLM), then fine-tuning
  from that output dir, against fine-tuning straight from the package.
Needs `make data`. Every run is `hpcnlp finetune` / `hpcnlp pretrain` itself, in outputs/quality/;
results are merged into bench/results/finetune_quality.{json,md} after each run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from hpcnlp.cli import main as hpcnlp
from hpcnlp.report import markdown_table
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "data" / "full"
WORK = REPO / "outputs" / "quality"
RESULTS = REPO / "bench" / "results"
FREEZE = {"none": {}, "first-5-of-6": {"layers": 5}, "all-but-head": {"all_but_head": True}}
SEED_002 = {"none": 0.85, "first-5-of-6": 0.80, "all-but-head": 0.63}  # bert-base, 12 layers (10 of 12 frozen)


def _write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _training(epochs: float, lr: float) -> dict:
    # One epoch: nothing to choose between, so no per-epoch evaluation or checkpoint (CPU time).
    every_epoch = "epoch" if epochs > 1 else "no"
    return {
        "num_train_epochs": epochs,
        "learning_rate": lr,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "eval_strategy": every_epoch,
        "save_strategy": every_epoch,
        "load_best_model_at_end": epochs > 1,
        "save_total_limit": 1,
        "bf16": False,  # fp32 as recorded in bench/results: never training.bf16: auto's pick
        "logging_steps": 25,
        "seed": 42,
    }


def finetune(name: str, task: str, data: dict, training: dict, **top) -> dict:
    out = WORK / name
    cfg = {
        "job": "finetune",
        "task": task,
        "model_name_or_path": "minilm-l6",
        "output_dir": str(out),
        "overwrite": True,
        "data": {"max_seq_length": 128, **data},
        "training": training,
        **top,
    }
    t = time.perf_counter()
    assert hpcnlp(["finetune", "--config", str(_write(WORK / f"{name}.yaml", cfg))]) == 0, name
    m = json.loads((out / "metrics.json").read_text())
    return {
        "name": name,
        "wall_seconds": round(time.perf_counter() - t),
        "train_samples": m["data"]["train"].get("examples", m["data"]["train"].get("sentences")),
        "global_step": m["global_step"],
        "samples_per_second": m["samples_per_second"],
        "trainable_parameters": m["freeze"]["trainable_parameters"],
        "test": m["eval"]["test"],
        "validation": {k: v for k, v in m["eval"]["validation"].items() if not isinstance(v, dict)},
    }


def rotten(args) -> dict:
    rt = FULL / "rotten-tomatoes"
    return {
        "train_file": str(rt / "train.csv"),
        "validation_file": str(rt / "validation.csv"),
        "test_file": str(rt / "test.csv"),
        "max_train_samples": args.max_train_samples,
    }


def run_freeze(args, results: dict) -> list[dict]:
    return [
        {
            **finetune(
                f"rt-freeze-{k}",
                "sequence-classification",
                rotten(args),
                _training(args.epochs, 5e-5 if k == "none" else 1e-4 if k != "all-but-head" else 1e-3),
                freeze=v,
            ),
            "seed_002_bert_base_f1": SEED_002[k],
        }
        for k, v in FREEZE.items()
    ]


def run_ner(args, results: dict) -> list[dict]:
    w = FULL / "wnut16"
    data = {
        "train_file": str(w / "train.conll"),
        "validation_file": str(w / "validation.conll"),
        "test_file": str(w / "test.conll"),
        "max_train_samples": args.max_train_samples,
    }
    return [
        finetune(
            "wnut16",
            "token-classification",
            data,
            _training(args.ner_epochs, 1e-4),
            early_stopping_patience=2 if args.ner_epochs > 1 else None,
        )
    ]


def run_pipeline(args, results: dict) -> list[dict]:
    import pandas as pd

    rt = FULL / "rotten-tomatoes"
    text = WORK / "rt-train-snippets.txt"  # training split only: no test snippet is ever seen
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(pd.read_csv(rt / "train.csv").text.str.replace("\n", " ")) + "\n")
    pre = WORK / "pretrain-rt"
    cfg = {
        "job": "pretrain",
        "model_name_or_path": "minilm-l6",
        "output_dir": str(pre),
        "overwrite": True,
        "data": {
            "train_files": [str(text)],
            "sample_by": "line",
            "max_seq_length": 64,
            "eval_fraction": 0.05,
            "prepared_root": str(WORK / "prepared"),
        },
        "training": {
            "max_steps": args.pretrain_steps,
            "learning_rate": 1e-4,
            "warmup_ratio": 0.06,
            "per_device_train_batch_size": 32,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 50,
            "seed": 42,
            "bf16": False,  # fp32 as recorded in bench/results: never training.bf16: auto's pick
        },
    }
    t = time.perf_counter()
    assert hpcnlp(["pretrain", "--config", str(_write(WORK / "pretrain-rt.yaml", cfg))]) == 0
    pm = json.loads((pre / "metrics.json").read_text())
    pretrain = {
        "steps": pm["global_step"],
        "perplexity_before": pm["eval_before"]["perplexity"],
        "perplexity_after": pm["eval_after"]["perplexity"],
        "wall_seconds": round(time.perf_counter() - t),
    }
    # From the package with the same settings is the freeze piece's "none" run: reuse it when it matches.
    same = results.get("settings", {}).get("freeze", {})
    package = next(
        (
            r
            for r in results["pieces"].get("freeze", [])
            if r["name"] == "rt-freeze-none"
            and (same.get("max_train_samples"), same.get("epochs")) == (args.max_train_samples, args.epochs)
        ),
        None,
    ) or finetune("rt-from-package", "sequence-classification", rotten(args), _training(args.epochs, 5e-5))
    adapted = finetune(
        "rt-from-pretrain",
        "sequence-classification",
        rotten(args),
        _training(args.epochs, 5e-5),
        model_name_or_path=str(pre),
    )
    return [package, {**adapted, "pretrain": pretrain}]


def save(results: dict) -> None:
    atomic_write_json(RESULTS / "finetune_quality.json", results)
    rows = []
    for piece, runs in results["pieces"].items():
        for r in runs:
            t = r["test"]
            rows.append(
                {
                    "piece": piece,
                    "run": r["name"],
                    "train samples": r["train_samples"],
                    "steps": r["global_step"],
                    "test f1": t["f1"],
                    "test accuracy": t.get("accuracy", t.get("token_accuracy")),
                    "seed 002 bert-base f1": r.get("seed_002_bert_base_f1", ""),
                    "samples/s": r["samples_per_second"],
                    "wall s": r["wall_seconds"],
                }
            )
    per_type = [{"type": k, **v} for r in results["pieces"].get("ner", []) for k, v in r["test"]["per_type"].items()]
    settings = "; ".join(f"{k}: {v}" for k, v in results.get("settings", {}).items())
    text = [
        "# Fine-tuning quality (data/full, MiniLM-L6, CPU)",
        "",
        f"Test = the held-out split of data/full (Rotten Tomatoes split by movie). Settings: {settings}",
        "",
        markdown_table(rows),
    ]
    if per_type:
        text += [
            "",
            "## WNUT-2016 test, per entity type",
            "",
            markdown_table(per_type, ["type", "precision", "recall", "f1", "support"]),
        ]
    atomic_write_text(RESULTS / "finetune_quality.md", "\n".join(text) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pieces", nargs="*", default=["freeze", "ner", "pipeline"])
    p.add_argument("--max-train-samples", type=int, default=None, help="first N training rows (CPU budget)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--ner-epochs", type=float, default=5.0)
    p.add_argument("--pretrain-steps", type=int, default=300)
    args = p.parse_args()
    if not (FULL / "rotten-tomatoes" / "train.csv").is_file():
        raise SystemExit("no data/full/: run `make data` first")
    path = RESULTS / "finetune_quality.json"
    results = json.loads(path.read_text()) if path.is_file() else {"pieces": {}}
    for piece in args.pieces:
        results["pieces"][piece] = {"freeze": run_freeze, "ner": run_ner, "pipeline": run_pipeline}[piece](
            args, results
        )
        results.setdefault("settings", {})[piece] = {k: v for k, v in vars(args).items() if k != "pieces"}
        save(results)


if __name__ == "__main__":
    main()
