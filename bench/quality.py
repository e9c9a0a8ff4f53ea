"""Quality bench (issues 18, 29): does domain pretraining help, and how good are the 6-layer MiniLM and its
3-layer int8 student on the full Rotten Tomatoes test split? Hours of CPU; not in CI.

    python -m bench.quality [--pieces kernel rt wnut student] [--seeds 1 2 3] [--sources package dapt]
                            [--kernel-budgets low full] [--epochs 3] [--lr 5e-5] [--ner-epochs 5]
                            [--max-train-samples N] [--work DIR] [--results DIR]
    python -m bench --only quality      # the same with every default, output captured until it ends

Needs `make data` (data/full/: kernel-docs/, rotten-tomatoes/domain.txt, wnut16/domain-tweets.txt).
- kernel: the technical domain (data/fetch_kernel_docs.py). `hpcnlp prepare` of the domain text, then DAPT with
  jobs/pretrain-kernel-docs.yaml as shipped (bf16: auto), then jobs/finetune-kernel-docs.yaml from the package
  and from the DAPT model at two label budgets (train-low.jsonl, train.jsonl), once per seed each; the paired
  per-seed difference, its standard error, the held-out domain perplexity along DAPT (quality-kernel.png).
  About 2.5 CPU-hours (DAPT ~45 CPU-minutes on this Xeon with bf16).
- rt: fine-tune Rotten Tomatoes (movie-disjoint splits) from the package and from the package after
  `hpcnlp pretrain` on RT domain text (training snippets + plot summaries; with head warm-up), once per
  seed each; test macro-F1 of the epoch best on validation macro-F1 (load_best_model_at_end).
- self-distill: jobs/finetune-sentiment.yaml as shipped (bf16: auto) once per --ensemble-seeds seed, then per
  seed jobs/self-distill-sentiment.yaml: the package MiniLM-L6 taught by that ensemble (the same teachers for
  every student seed); per-seed difference student - teacher, the ensemble's own test macro-F1.
- wnut: the same for WNUT-2016 NER (entity F1); domain text: VADER's tweets minus WNUT's held-out ones.
- student: per seed, the rt fine-tune (--student-teacher: dapt, the shipped pipeline's road, package, or
  self-distill)
  as teacher -> `hpcnlp distill` (3 layers) -> `hpcnlp export` (dynamic int8) -> `hpcnlp validate`; the
  int8 model's test macro-F1 (skip: leave it out of --pieces).
One domain-pretrained model per task (seed 42) serves every fine-tune seed: the error bars are over
fine-tuning seeds, not over pretraining runs.

Every run is an hpcnlp job from the shipped configs (jobs/*.yaml) with dotted overrides, in
<work>/runs/<run>-<key>/, where key hashes the run's resolved config (the job file + its overrides, but not
output_dir), so a run is reused by any settings that make the same job (the WNUT runs when only the RT
epochs change) and never by settings that change it. Resumable: a finished run (its job's
metrics.json/validation.json + bench.json with its CPU time) is read back, not rerun; an interrupted one
continues from its checkpoint (resume: auto). quality.json/.md are rewritten after each run from every
finished run of the current settings, so `--seeds 1`, then `--seeds 2 3`, or `--pieces rt`, then
`--pieces wnut student`, add up; `--pieces` with nothing after it only rewrites them.

The jobs run one at a time as child processes of this one, not through `hpcnlp sweep` on Slurm: the
local Slurm here is a test cluster on the same 2 cores, so a sweep would queue the same runs one after
another with nothing gained, and a child process lets the bench count each run's CPU time (getrusage
of its children: the whole job, data loading and evaluation included, so an upper bound on training).
On a real cluster the configs the runs record (<run>/config.resolved.yaml) can go to `hpcnlp sweep`.
Every default: about 10 CPU-hours (kernel ~2.5, self-distill ~2.5 with bf16, the rest ~5). Two bench processes with
`--threads 1` on disjoint `--pieces`/`--seeds` (never the same run twice at once) got ~1.4x the tokens/s
of one with 2 threads here (the RT grid of bench/results/quality-grid.md ran through `hpcnlp sweep`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "data" / "full"
JOBS = REPO / "jobs"


# --- one run: an hpcnlp job in a child process, recorded -------------------------------------
def job(args, name: str, command: str, config: Path, overrides: dict, done: str = "metrics.json") -> dict | None:
    """Run (or read back) one hpcnlp job: {"dir", "cpu_seconds", "wall_seconds"}; None when args.read_only
    and it has not finished."""
    out, items = run_dir(args, name, command, config, overrides)
    record = out / "bench.json"
    if record.is_file() and list(out.rglob(done)):
        return {**json.loads(record.read_text()), "dir": str(out)}
    if args.read_only:
        return None
    # "<run>" in a value (validate's output_dir and rejected_dir) is this run's directory: not part of the key
    cmd = [
        sys.executable,
        "-m",
        "hpcnlp",
        command,
        "--config",
        str(config),
        *([] if "output_dir" in overrides else [f"output_dir={out}"]),
        *(i.replace("<run>", str(out)) for i in items),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    print(f"[quality] {name}: {' '.join(cmd[2:])}", flush=True)
    before, t = _children_cpu(), time.perf_counter()
    code = subprocess.call(cmd, env=env, cwd=REPO)
    if code != 0:
        raise SystemExit(f"[quality] {name} failed (exit {code}); rerun the same command to resume")
    if not list(out.rglob(done)):
        raise SystemExit(f"[quality] {name}: no {done} in {out}")
    r = {
        "dir": str(out),
        "cpu_seconds": round(_children_cpu() - before, 1),
        "wall_seconds": round(time.perf_counter() - t, 1),
    }
    record.write_text(json.dumps(r))
    return r


def run_dir(args, name: str, command: str, config: Path, overrides: dict) -> tuple[Path, list[str]]:
    """<work>/runs/<name>-<hash of the resolved config but output_dir>, and the overrides as CLI items."""
    from hpcnlp.config import read_yaml, with_overrides

    items = [
        f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items() if v is not None
    ]
    resolved = with_overrides(read_yaml(config), items)
    resolved.pop("output_dir", None)
    key = hashlib.sha256(json.dumps([command, resolved], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return args.work / "runs" / f"{name}-{key}", items


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _metrics(r: dict) -> dict:
    return json.loads((Path(r["dir"]) / "metrics.json").read_text())


# --- the runs --------------------------------------------------------------------------------
def _rt_data(args) -> dict:
    rt = FULL / "rotten-tomatoes"
    return {
        "data.train_file": str(rt / "train.csv"),
        "data.validation_file": str(rt / "validation.csv"),
        "data.test_file": str(rt / "test.csv"),
        "data.max_train_samples": args.max_train_samples,
        "data.max_eval_samples": args.max_eval_samples,
    }


def _rt_data_relative(args) -> dict:
    """The same, repo-relative: the run's key does not depend on where the checkout lies."""
    return {k: os.path.relpath(v, REPO) if k.endswith("_file") else v for k, v in _rt_data(args).items()}


def _ner_data(args) -> dict:
    w = FULL / "wnut16"
    return {
        "data.train_file": str(w / "train.conll"),
        "data.validation_file": str(w / "validation.conll"),
        "data.test_file": str(w / "test.conll"),
        "data.max_train_samples": args.max_train_samples,
        "data.max_eval_samples": args.max_eval_samples,
    }


def _finetune_training(epochs: float, lr: float, seed: int, max_steps: int | None) -> dict:
    return {
        "training.learning_rate": lr,
        "training.warmup_ratio": 0.1,
        "training.num_train_epochs": epochs,
        "training.per_device_train_batch_size": 16,
        "training.seed": seed,
        "training.save_total_limit": 1,
        "training.max_steps": max_steps,
        "training.bf16": False,  # fp32 as recorded in bench/results: never training.bf16: auto's pick
        "early_stopping_patience": "null",
    }


def pretrain(args, task: str) -> dict:
    """The domain-pretrained model of a task (one, seed 42), with head warm-up."""
    text, steps = {
        "rt": (FULL / "rotten-tomatoes" / "domain.txt", args.rt_pretrain_steps),
        "wnut": (FULL / "wnut16" / "domain-tweets.txt", args.wnut_pretrain_steps),
    }[task]
    return job(
        args,
        f"pretrain-{task}",
        "pretrain",
        JOBS / "pretrain.yaml",
        {
            "data.train_files": [str(text)],
            "data.sample_by": "line",
            "data.max_seq_length": 128,
            "data.prepared_root": str(args.work / "prepared"),
            "data.num_proc": 1,
            "head_warmup_steps": max(1, round(steps * args.head_warmup)),
            "head_learning_rate": args.head_lr,
            "training.max_steps": steps,
            "training.learning_rate": args.pretrain_lr,
            "training.warmup_ratio": 0.06,
            "training.save_steps": max(1, steps // 4),
            "training.eval_steps": max(1, steps // 4),
            "training.logging_steps": 10,
            "training.bf16": False,  # fp32 as recorded in bench/results: never training.bf16: auto's pick
        },
    )


# --- the technical domain (issue 29): Linux kernel docs, DAPT on the rest of Documentation/ ------
KERNEL = FULL / "kernel-docs"


def kernel_prepare(args) -> dict | None:
    """`hpcnlp prepare` of jobs/pretrain-kernel-docs.yaml's domain text, into this run's own dir."""
    return job(
        args,
        "kernel-prepare",
        "prepare",
        JOBS / "prepare.yaml",
        {"data_from": str(JOBS / "pretrain-kernel-docs.yaml"), "data.prepared_root": "<run>", "data.num_proc": 1},
        done="stats.json",
    )


def kernel_pretrain(args) -> dict | None:
    """DAPT with the shipped config as a user submits it (bf16: auto), on the data prepared above."""
    prepared = kernel_prepare(args)
    if prepared is None:
        return None
    return job(
        args,
        "kernel-pretrain",
        "pretrain",
        JOBS / "pretrain-kernel-docs.yaml",
        {
            "data.prepared_root": prepared["dir"],
            "data.max_eval_blocks": args.max_eval_samples,
            "training.max_steps": args.kernel_pretrain_steps,
            "head_warmup_steps": min(100, max(1, args.kernel_pretrain_steps // 10)),
        },
    )


def kernel_finetune(args, budget: str, source: str, seed: int) -> dict | None:
    model = "minilm-l6" if source == "package" else (kernel_pretrain(args) or {}).get("dir")
    if model is None:
        return None
    r = job(
        args,
        f"kernel-{budget}-{source}-s{seed}",
        "finetune",
        JOBS / "finetune-kernel-docs.yaml",
        {
            "model_name_or_path": model,
            "data.train_file": str(KERNEL / ("train-low.jsonl" if budget == "low" else "train.jsonl")),
            "training.num_train_epochs": args.kernel_low_epochs if budget == "low" else args.kernel_full_epochs,
            "training.seed": seed,
            "training.max_steps": args.max_steps,
            "data.max_eval_samples": args.max_eval_samples,
        },
    )
    if r is None:
        return None
    m = _metrics(r)
    return {
        **r,
        "test_f1": m["eval"]["test"]["f1"],
        "test_accuracy": m["eval"]["test"]["accuracy"],
        "validation_f1": m["eval"]["validation"]["f1"],
        "bf16": m.get("bf16"),
    }


def kernel_probe(args) -> dict | None:
    """Frozen-encoder probe, the representation without fine-tuning noise: logistic regression on the
    last layer's mean-pooled and [CLS] features of train-low.jsonl -> test macro-F1, for the package and
    each DAPT checkpoint kept. One forward pass per text; cached in <work>/kernel-probe.json."""
    cache = args.work / "kernel-probe.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    pre = None if args.read_only else kernel_pretrain(args)
    if pre is None:
        return None
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from transformers import AutoModel

    from hpcnlp.models import load_tokenizer, resolve_model_path

    package = resolve_model_path("minilm-l6")
    tokenizer = load_tokenizer(package)
    rows = {s: [json.loads(x) for x in (KERNEL / f"{s}.jsonl").read_text().splitlines()] for s in ("train-low", "test")}
    models = {0: package} | {
        int(c.name[11:]): str(c) for c in Path(pre["dir"]).glob("checkpoint-*") if (c / "model.safetensors").is_file()
    }
    out = []
    torch.manual_seed(0)
    for step, path in sorted(models.items()):
        net = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
        feats = {}
        for split, data in rows.items():
            mean, cls = [], []
            for i in range(0, len(data), 64):
                enc = tokenizer(
                    [r["text"] for r in data[i : i + 64]],
                    truncation=True,
                    max_length=128,
                    padding=True,
                    return_tensors="pt",
                )
                with torch.inference_mode():
                    h = net(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                mean.append((h * m).sum(1) / m.sum(1))
                cls.append(h[:, 0])
            feats[split] = {"mean": torch.cat(mean).numpy(), "cls": torch.cat(cls).numpy()}
        point = {"dapt_step": step}
        for pooling in ("mean", "cls"):
            clf = LogisticRegression(max_iter=3000, C=1.0).fit(
                feats["train-low"][pooling], [r["label"] for r in rows["train-low"]]
            )
            pred = clf.predict(feats["test"][pooling])
            point[f"test_macro_f1_{pooling}"] = round(
                f1_score([r["label"] for r in rows["test"]], pred, average="macro"), 4
            )
        print(f"[quality] kernel probe: {point}", flush=True)
        out.append(point)
    result = {"probe": out}
    cache.write_text(json.dumps(result, indent=1))
    return result


def kernel_curve(pre: dict) -> list[dict]:
    """Held-out domain perplexity by DAPT step: eval_before, then every evaluation the run logged."""
    m = _metrics(pre)
    points = [{"step": 0, "perplexity": round(m["eval_before"]["perplexity"], 2)}]
    states = sorted(Path(pre["dir"]).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    if states:
        for e in json.loads(states[-1].read_text())["log_history"]:
            if "eval_loss" in e:
                points.append({"step": e["step"], "perplexity": round(math.exp(e["eval_loss"]), 2)})
    last = {"step": m["global_step"], "perplexity": round(m["eval_after"]["perplexity"], 2)}
    return [p for p in points if p["step"] != last["step"]] + [last]


def finetune(args, task: str, source: str, seed: int) -> dict | None:
    model = "minilm-l6" if source == "package" else (pretrain(args, task) or {}).get("dir")
    if model is None:
        return None
    if task == "rt":
        config, data, epochs, lr = JOBS / "finetune-sentiment.yaml", _rt_data(args), args.epochs, args.lr
    else:
        config, data, epochs, lr = JOBS / "finetune-ner.yaml", _ner_data(args), args.ner_epochs, args.ner_lr
    r = job(
        args,
        f"{task}-{source}-s{seed}",
        "finetune",
        config,
        {"model_name_or_path": model, **data, **_finetune_training(epochs, lr, seed, args.max_steps)},
    )
    if r is None:
        return None
    m = _metrics(r)
    return {**r, "test_f1": m["eval"]["test"]["f1"], "validation_f1": m["eval"]["validation"]["f1"]}


def rt_teacher(args, seed: int) -> dict | None:
    """jobs/finetune-sentiment.yaml as a user submits it (bf16: auto, early stopping as shipped) on the full data."""
    r = job(
        args,
        f"rt-teacher-s{seed}",
        "finetune",
        JOBS / "finetune-sentiment.yaml",
        {**_rt_data_relative(args), "training.seed": seed, "training.max_steps": args.max_steps},
    )
    if r is None:
        return None
    m = _metrics(r)
    return {**r, "test_f1": m["eval"]["test"]["f1"], "validation_f1": m["eval"]["validation"]["f1"]}


def self_distill(args, seed: int) -> dict | None:
    """The shipped RT recipe: jobs/self-distill-sentiment.yaml, the package MiniLM-L6 taught by the ensemble of
    --ensemble-seeds fine-tunes (the same teachers for every student seed: error bars over student seeds)."""
    teachers = [rt_teacher(args, k) for k in args.ensemble_seeds]
    if any(t is None for t in teachers):
        return None
    r = job(
        args,
        f"rt-selfdistill-s{seed}",
        "distill",
        JOBS / "self-distill-sentiment.yaml",
        {
            "teacher": [t["dir"] for t in teachers],
            **_rt_data_relative(args),
            "training.seed": seed,
            "training.max_steps": args.max_steps,
            **({"latency.repeats": 2} if args.smoke else {}),
        },
    )
    if r is None:
        return None
    m = _metrics(r)
    return {
        **r,
        "test_f1": m["student"]["test_metrics"]["f1"],
        "validation_f1": m["student"]["metrics"]["f1"],
        "ensemble_test_f1": m["teacher"]["test_metrics"]["f1"],
        "teachers": teachers,
    }


def student(args, seed: int) -> dict | None:
    if args.student_teacher == "self-distill":
        teacher = self_distill(args, seed)
    else:
        teacher = finetune(args, "rt", args.student_teacher, seed)
    if teacher is None:
        return None
    d = job(
        args,
        f"student-distill-s{seed}",
        "distill",
        JOBS / "distill.yaml",
        {
            "teacher": teacher["dir"],
            **{k: v for k, v in _rt_data(args).items() if k != "data.test_file"},
            "training.seed": seed,
            "training.num_train_epochs": args.distill_epochs,
            "training.max_steps": args.max_steps,
            "training.bf16": False,  # fp32 as recorded in bench/results: never training.bf16: auto's pick
            **({"latency.repeats": 2} if args.smoke else {}),
        },
    )
    if d is None:
        return None
    e = job(
        args,
        f"student-export-s{seed}",
        "export",
        JOBS / "export.yaml",
        {"model_name_or_path": d["dir"], "data.train_file": _rt_data(args)["data.train_file"]},
    )
    if e is None:
        return None
    v = job(
        args,
        f"student-validate-s{seed}",
        "validate",
        JOBS / "validate.yaml",
        {
            "model_name_or_path": d["dir"],
            "onnx_dir": e["dir"],
            "version": f"s{seed}",
            "output_dir": "<run>/artifacts",
            "rejected_dir": "<run>/rejected",
            **({"latency.repeats": 2, "int8_search.max_attempts": 0} if args.smoke else {}),
            **{k: v for k, v in _rt_data(args).items() if k != "data.max_train_samples"},
        },
        done="validation.json",
    )
    if v is None:
        return None
    report = json.loads(next(Path(v["dir"]).rglob("validation.json")).read_text())
    test = report.get("test_metrics", {})
    return {
        "teacher_test_f1": teacher["test_f1"],
        "student_test_f1": test.get("pytorch", {}).get("f1"),
        "int8_test_f1": test.get("onnx_int8", {}).get("f1"),
        "passed": report["passed"],
        "cpu_seconds": d["cpu_seconds"],
        "dirs": [d["dir"], e["dir"], v["dir"]],
    }


# --- results ---------------------------------------------------------------------------------
def _stat(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _paired(a: dict, b: dict) -> dict:
    """Per-seed differences a - b: mean, std, standard error, and whether the mean is above 2 SE."""
    d = _stat([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if d["n"] > 1:
        d["se"] = round(d["std"] / math.sqrt(d["n"]), 4)
        d["above_2se"] = d["mean"] > 2 * d["se"]
    return d


def kernel_results(args, seeds: list[int]) -> dict:
    """The technical-domain figures (read-only: finished runs only)."""
    runs = {}
    for budget in ("low", "full"):
        for source in ("package", "dapt"):
            for seed in seeds:
                if (r := kernel_finetune(args, budget, source, seed)) is not None:
                    runs[budget, source, seed] = r
    if not runs and kernel_pretrain(args) is None:
        return {}
    out = {"kernel_test_macro_f1": {}, "kernel_runs": []}
    for budget in ("low", "full"):
        f1 = {
            src: {s: r["test_f1"] for (b, x, s), r in runs.items() if (b, x) == (budget, src)}
            for src in ("package", "dapt")
        }
        out["kernel_test_macro_f1"][budget] = {src: _stat(list(v.values())) for src, v in f1.items()}
        out[f"dapt_effect_kernel_{budget}"] = _paired(f1["dapt"], f1["package"])
    for (budget, source, seed), r in sorted(runs.items()):
        out["kernel_runs"].append(
            {
                "budget": budget,
                "source": source,
                "seed": seed,
                "test_f1": round(r["test_f1"], 4),
                "test_accuracy": round(r["test_accuracy"], 4),
                "validation_f1": round(r["validation_f1"], 4),
                "bf16": r["bf16"],
                "cpu_minutes": round(r["cpu_seconds"] / 60, 1),
            }
        )
    stats = json.loads((KERNEL / "stats.json").read_text())
    out["kernel_task"] = {
        k: stats.get(k) for k in ("source", "paragraphs", "files", "majority_baseline_test_accuracy", "domain_mb")
    }
    prep, pre = kernel_prepare(args), kernel_pretrain(args)
    if pre is not None:
        m = _metrics(pre)
        out["kernel_pretrain"] = {
            "perplexity_before": round(m["eval_before"]["perplexity"], 1),
            "perplexity_after": round(m["eval_after"]["perplexity"], 1),
            "masked_accuracy_before": m["eval_before"].get("masked_accuracy"),
            "masked_accuracy_after": m["eval_after"].get("masked_accuracy"),
            "curve": kernel_curve(pre),
            "global_step": m["global_step"],
            "train_tokens": m.get("train_tokens"),
            "bf16": m.get("bf16"),
            "prepared": {
                k: m["prepared"].get(k)
                for k in ("tokens_train", "tokens_eval", "documents_train", "duplicates_removed", "fingerprint")
            },
        }
    if (probe := kernel_probe(args)) is not None:
        out["kernel_probe"] = probe["probe"]
    out["kernel_cpu_minutes"] = {
        "prepare": round(prep["cpu_seconds"] / 60, 1) if prep else None,
        "pretrain": round(pre["cpu_seconds"] / 60, 1) if pre else None,
        **{
            f"finetune_{b}_per_run": round(statistics.fmean(v) / 60, 1)
            for b in ("low", "full")
            if (v := [r["cpu_seconds"] for (x, _, _), r in runs.items() if x == b])
        },
    }
    return out


def collect(args) -> dict:
    """Every finished run of these settings (any seed) -> the figures the issue asks for."""
    seeds = sorted(
        {int(m[1]) for p in (args.work / "runs").glob("*-s*-*") if (m := re.search(r"-s(\d+)-[0-9a-f]{8}$", p.name))}
    )
    read_only, args.read_only = args.read_only, True  # read finished runs back, run nothing
    try:
        runs, per_task = [], {}
        for task in ("rt", "wnut"):
            for source in ("package", "dapt"):
                for seed in seeds:
                    if (r := finetune(args, task, source, seed)) is None:
                        continue
                    runs.append(
                        {
                            "task": task,
                            "source": source,
                            "seed": seed,
                            "test_f1": r["test_f1"],
                            "validation_f1": r["validation_f1"],
                            "cpu_minutes": round(r["cpu_seconds"] / 60, 1),
                        }
                    )
                    per_task.setdefault((task, source), {})[seed] = r
        teachers = {s: r for s in seeds if (r := rt_teacher(args, s)) is not None}
        selfd = {s: r for s in seeds if (r := self_distill(args, s)) is not None}
        for source, done in (("ensemble teacher", teachers), ("self-distill", selfd)):
            runs += [
                {
                    "task": "rt",
                    "source": source,
                    "seed": seed,
                    "test_f1": r["test_f1"],
                    "validation_f1": r["validation_f1"],
                    "cpu_minutes": round(r["cpu_seconds"] / 60, 1),
                }
                for seed, r in done.items()
            ]
        pre = {t: p for t in ("rt", "wnut") if (p := pretrain(args, t)) is not None}
        students = {s: r for s in seeds if (r := student(args, s)) is not None}
        kernel = kernel_results(args, seeds)
    finally:
        args.read_only = read_only

    def f1(task, source):
        return _stat([r["test_f1"] for r in per_task.get((task, source), {}).values()])

    def effect(task):
        a, b = per_task.get((task, "dapt"), {}), per_task.get((task, "package"), {})
        return _stat([a[s]["test_f1"] - b[s]["test_f1"] for s in sorted(set(a) & set(b))])

    def cpu_minutes(task, source):
        v = [r["cpu_seconds"] for r in per_task.get((task, source), {}).values()]
        return round(statistics.fmean(v) / 60, 1) if v else None

    def mean_minutes(done: dict) -> float | None:
        return round(statistics.fmean([r["cpu_seconds"] for r in done.values()]) / 60, 1) if done else None

    rt = {s: f1("rt", s) for s in ("package", "dapt")}
    rt["self-distill"] = _stat([r["test_f1"] for r in selfd.values()])
    pre_min = {t: round(p["cpu_seconds"] / 60, 1) for t, p in pre.items()}
    int8 = _stat([s["int8_test_f1"] for s in students.values()])
    return {
        "rt_test_macro_f1": rt,
        "rt_self_distill": {
            "ensemble_seeds": args.ensemble_seeds,
            "ensemble_test_macro_f1": next(iter(selfd.values()))["ensemble_test_f1"] if selfd else None,
            "teachers_test_macro_f1": _stat([r["test_f1"] for r in teachers.values()]),
            "validation_macro_f1": _stat([r["validation_f1"] for r in selfd.values()]),
            # student seed s - teacher seed s: what self-distillation adds to one fine-tune of the same recipe
            "effect_vs_teacher": _paired(
                {s: r["test_f1"] for s, r in selfd.items()}, {s: r["test_f1"] for s, r in teachers.items()}
            ),
        },
        "rt_student_int8_test_macro_f1_mean": int8["mean"],
        "rt_student_int8_test_macro_f1_std": int8["std"],
        "rt_student_fp32_test_macro_f1": _stat([s["student_test_f1"] for s in students.values()]),
        "dapt_effect_rt": effect("rt"),
        "dapt_effect_wnut": effect("wnut"),
        "wnut_test_entity_f1": {s: f1("wnut", s) for s in ("package", "dapt")},
        # CPU minutes of one run's child process (job start to end: data, training, evaluation).
        "train_cpu_minutes_detail": {
            "rt_finetune_per_run": {s: cpu_minutes("rt", s) for s in ("package", "dapt")},
            "wnut_finetune_per_run": {s: cpu_minutes("wnut", s) for s in ("package", "dapt")},
            "pretrain": pre_min,
            "rt_teacher_per_run": mean_minutes(teachers),
            "rt_self_distill_per_run": mean_minutes(selfd),
            "student_distill_per_run": round(statistics.fmean([s["cpu_seconds"] for s in students.values()]) / 60, 1)
            if students
            else None,
        },
        "pretrain": {
            t: {
                k: _metrics(p).get(k)
                for k in ("eval_before", "eval_after", "global_step", "head_warmup_steps", "mlm_head_new")
            }
            for t, p in pre.items()
        },
        **kernel,
        "students": {str(s): {k: v for k, v in r.items() if k != "dirs"} for s, r in students.items()},
        "seeds": seeds,
        "settings": args.settings,
        "machine": {"cores": os.cpu_count(), "threads_per_job": args.threads},
        "runs": runs,
    }


def _ms(s: dict) -> str:
    """mean ± std (n) of a _stat, or nothing when no run finished."""
    return "" if s.get("mean") is None else f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"


def _empty(v) -> bool:
    if isinstance(v, dict):
        return v.get("n") == 0 if "n" in v else all(_empty(x) for x in v.values())
    return v is None or v == []


HEADLINE = ("rt_test_macro_f1_mean", "rt_test_macro_f1_std", "rt_test_macro_f1_source", "train_cpu_minutes")
WHOLE = ("students",)  # figures of one set of runs: never mixed with an earlier set
BOOKKEEPING = ("carried_over", "carried_over_settings", "settings", "seeds", "machine", *HEADLINE)


def carry_over(results: dict, previous: dict) -> dict:
    """Figures with no finished run in this work dir are taken from the previous quality.json, entry by entry
    (rt_test_macro_f1.package while self-distill is new), so a run of one piece does not blank the others'
    measured figures. carried_over names them (dotted keys); carried_over_settings gives, per group of them,
    the settings they were measured with."""
    carried: list[str] = []

    def fill(new, old, key: str):
        if _empty(new) and not _empty(old):
            carried.append(key)
            return old
        if key == "runs" and old:  # one row per run: earlier rows of runs not in this work dir stay
            seen = {(r["task"], r["source"], r["seed"]) for r in new}
            if earlier := [r for r in old if (r["task"], r["source"], r["seed"]) not in seen]:
                carried.append("runs (earlier rows)")
            return new + earlier
        if isinstance(new, dict) and isinstance(old, dict) and "n" not in new and key not in WHOLE:
            return {k: fill(new.get(k), old.get(k), f"{key}.{k}") for k in {**old, **new}}
        return new

    out = {k: fill(results.get(k), previous.get(k), k) for k in {**previous, **results} if k not in BOOKKEEPING}
    out.update({k: results[k] for k in BOOKKEEPING if k in results})
    if carried:
        out["carried_over"] = sorted(carried)
        groups: dict[str, dict] = {}
        for key in carried:
            settings = _settings_of(previous, key)
            groups.setdefault(json.dumps(settings, sort_keys=True), {"settings": settings, "keys": []})["keys"].append(
                key
            )
        out["carried_over_settings"] = list(groups.values())
    return out


def _settings_of(previous: dict, key: str) -> dict | None:
    """The settings a figure of the previous quality.json was measured with: its own run's, or, when it was
    carried there too, those it was carried with (the older format: one settings dict for all)."""
    before = previous.get("carried_over_settings")
    for group in (
        before if isinstance(before, list) else [{"settings": before, "keys": previous.get("carried_over", [])}]
    ):
        if any(_base(key) == _base(k) or key.startswith(k + ".") for k in group["keys"]):
            return group["settings"]
    return previous.get("settings")


def _base(key: str) -> str:
    """ "runs (earlier rows)" -> "runs": the rows carried are those of the runs carried before."""
    return key.split(" (", maxsplit=1)[0]


def rt_headline(r: dict) -> dict:
    """The best RT recipe measured (after carry-over): its test macro-F1 and its CPU minutes on the road to it."""
    rt = r["rt_test_macro_f1"]
    best = max(rt, key=lambda s: rt[s]["mean"] if rt[s].get("mean") is not None else -1)
    d = r["train_cpu_minutes_detail"]
    per_run = d.get("rt_finetune_per_run") or {}
    cpu = {
        "package": per_run.get("package"),
        "dapt": per_run.get("dapt") and round(per_run["dapt"] + (d.get("pretrain") or {}).get("rt", 0), 1),
        "self-distill": d.get("rt_self_distill_per_run")
        and round(
            len(r["rt_self_distill"]["ensemble_seeds"]) * d["rt_teacher_per_run"] + d["rt_self_distill_per_run"], 1
        ),
    }
    return {
        "rt_test_macro_f1_mean": rt[best]["mean"],
        "rt_test_macro_f1_std": rt[best]["std"],
        "rt_test_macro_f1_source": best,
        "train_cpu_minutes": cpu.get(best),
    }


def kernel_chart(r: dict, out: Path) -> str | None:
    """quality-kernel.png: held-out domain perplexity along DAPT; test macro-F1 by label budget and start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcnlp.report import save_figure

    if "kernel_pretrain" not in r and not r.get("kernel_runs"):
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    curve = r.get("kernel_pretrain", {}).get("curve", [])
    if curve:
        a.plot([c["step"] for c in curve], [c["perplexity"] for c in curve], "o-")
        a.set_yscale("log")
    a.set(xlabel="DAPT optimizer step (32 x 128 tokens)", ylabel="MLM perplexity, held-out kernel docs")
    a.set_title("domain-adaptive pretraining")
    if probe := r.get("kernel_probe"):  # the frozen features' task value along the same steps
        twin = a.twinx()
        for pooling, style in (("mean", "s--"), ("cls", "^:")):
            twin.plot(
                [q["dapt_step"] for q in probe],
                [q[f"test_macro_f1_{pooling}"] for q in probe],
                style,
                color="tab:red",
                label=f"frozen-feature probe ({pooling}), 801 labels",
            )
        twin.set_ylabel("probe test macro-F1", color="tab:red")
        twin.legend(loc="upper right", fontsize=8)
    sizes = r.get("kernel_task", {}).get("paragraphs", {})
    budgets = {"low": sizes.get("train-low", 0), "full": sizes.get("train", 0)}
    for offset, (source, label) in zip((-0.04, 0.04), (("package", "package"), ("dapt", "DAPT first"))):
        pts = [(budgets[b], r["kernel_test_macro_f1"][b][source]) for b in budgets]
        pts = [(x, s) for x, s in pts if s["n"]]
        if pts:
            xs = [x * (1 + offset) for x, _ in pts]
            b.errorbar(
                xs, [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts], fmt="o-", capsize=4, label=label
            )
        seeds = [(budgets[x["budget"]] * (1 + offset), x["test_f1"]) for x in r["kernel_runs"] if x["source"] == source]
        if seeds:
            b.plot(*zip(*seeds), ".", color="grey", alpha=0.6)
    b.set_xscale("log")
    b.set(xlabel="labelled training paragraphs", ylabel="test macro-F1 (mean ± std; dots: seeds)")
    b.set_title("kernel-docs area classification")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    save_figure(fig, out / "quality-kernel.png")
    return "quality-kernel.png"


def kernel_markdown(r: dict) -> list[str]:
    from hpcnlp.report import markdown_table

    if "kernel_test_macro_f1" not in r:
        return []

    def effect(s: dict) -> str:
        if s.get("mean") is None:
            return ""
        se = f", SE {s['se']:.4f}, {'above' if s['above_2se'] else 'not above'} 2 SE" if "se" in s else ""
        return f"{s['mean']:+.4f} ± {s['std']:.4f} (n={s['n']}{se})"

    sizes = r["kernel_task"]["paragraphs"]
    rows = [
        {
            "label budget": f"{b} ({sizes['train-low' if b == 'low' else 'train']:,} paragraphs)",
            "from the package": _ms(r["kernel_test_macro_f1"][b]["package"]),
            "DAPT first": _ms(r["kernel_test_macro_f1"][b]["dapt"]),
            "effect (paired by seed)": effect(r[f"dapt_effect_kernel_{b}"]),
        }
        for b in ("low", "full")
    ]
    pre = r.get("kernel_pretrain", {})
    lines = [
        "## Technical domain: Linux kernel docs, 12 areas (issue 29)",
        "",
        f"Test macro-F1, mean ± std over fine-tuning seeds; majority baseline accuracy "
        f"{r['kernel_task']['majority_baseline_test_accuracy']:.3f}.",
        "",
        markdown_table(rows),
        "",
    ]
    if pre:
        lines += [
            f"DAPT: {pre['global_step']} steps, {pre['train_tokens']:,} tokens (bf16: {pre['bf16']}); held-out "
            f"domain perplexity {pre['perplexity_before']:,} -> {pre['perplexity_after']:,} (masked accuracy "
            f"{pre['masked_accuracy_before']} -> {pre['masked_accuracy_after']:.3f}); prepared: "
            f"{json.dumps(pre['prepared'])}.",
            "",
        ]
    if probe := r.get("kernel_probe"):
        lines += [
            "Frozen-encoder probe (logistic regression on the last layer's features of the 801 low-budget "
            "paragraphs, test macro-F1), by DAPT step (0 = the package):",
            "",
            markdown_table(probe),
            "",
        ]
    lines += [
        f"CPU minutes: {json.dumps(r['kernel_cpu_minutes'])}.",
        "",
        "![kernel docs](quality-kernel.png)",
        "",
        markdown_table(r["kernel_runs"]) if r["kernel_runs"] else "(no fine-tune finished yet)",
        "",
    ]
    return lines


def write(args, results: dict) -> dict:
    from hpcnlp.report import markdown_table
    from hpcnlp.runtime.io import atomic_write_json, atomic_write_text

    old = args.results / "quality.json"
    results = carry_over(results, json.loads(old.read_text()) if old.is_file() else {})
    results.update(rt_headline(results))
    r = results
    rows = [
        {
            "figure": "RT test macro-F1, fine-tuned from the package",
            "mean ± std over seeds": _ms(r["rt_test_macro_f1"]["package"]),
        },
        {
            "figure": "RT test macro-F1, from the domain-pretrained model",
            "mean ± std over seeds": _ms(r["rt_test_macro_f1"]["dapt"]),
        },
        {
            "figure": "RT: domain pretraining's effect (per-seed difference)",
            "mean ± std over seeds": _ms(r["dapt_effect_rt"]),
        },
        {
            "figure": "RT test macro-F1, jobs/finetune-sentiment.yaml as shipped (bf16: auto): the ensemble's teachers",
            "mean ± std over seeds": _ms(r["rt_self_distill"]["teachers_test_macro_f1"]),
        },
        {
            "figure": f"RT test macro-F1, the ensemble of seeds {r['rt_self_distill']['ensemble_seeds']} itself",
            "mean ± std over seeds": ""
            if r["rt_self_distill"]["ensemble_test_macro_f1"] is None
            else f"{r['rt_self_distill']['ensemble_test_macro_f1']:.4f} (one ensemble)",
        },
        {
            "figure": "RT test macro-F1, self-distilled from that ensemble (jobs/self-distill-sentiment.yaml)",
            "mean ± std over seeds": _ms(r["rt_test_macro_f1"]["self-distill"]),
        },
        {
            "figure": "RT: self-distillation's effect (student seed s - teacher seed s)",
            "mean ± std over seeds": _ms(r["rt_self_distill"]["effect_vs_teacher"]),
        },
        {
            "figure": "WNUT test entity F1, from the package",
            "mean ± std over seeds": _ms(r["wnut_test_entity_f1"]["package"]),
        },
        {
            "figure": "WNUT test entity F1, from the tweet-pretrained model",
            "mean ± std over seeds": _ms(r["wnut_test_entity_f1"]["dapt"]),
        },
        {
            "figure": "WNUT: domain pretraining's effect (per-seed difference)",
            "mean ± std over seeds": _ms(r["dapt_effect_wnut"]),
        },
        {
            "figure": "RT 3-layer student, int8 ONNX, test macro-F1",
            "mean ± std over seeds": _ms(
                {
                    "mean": r["rt_student_int8_test_macro_f1_mean"],
                    "std": r["rt_student_int8_test_macro_f1_std"],
                    "n": len(r["students"]),
                }
            ),
        },
        {
            "figure": "RT 3-layer student, PyTorch fp32, test macro-F1",
            "mean ± std over seeds": _ms(r["rt_student_fp32_test_macro_f1"]),
        },
    ]
    text = [
        "# Quality (issues 18, 29): MiniLM-L6 on Rotten Tomatoes and WNUT-2016, package vs domain-pretrained vs "
        "self-distilled",
        "",
        f"`python -m bench.quality`, settings {json.dumps(args.settings)}, seeds {r['seeds']}, "
        f"{os.cpu_count()} cores, {args.threads} threads per job. Test = data/full's held-out split.",
        "",
        markdown_table(rows),
        "",
        f"CPU minutes (whole job process, an upper bound on training): RT recipe reported above "
        f"({r['rt_test_macro_f1_source']}): {r['train_cpu_minutes']}; detail: "
        f"{json.dumps(r['train_cpu_minutes_detail'])}",
        "",
        "## Runs",
        "",
        markdown_table(r["runs"]) if r["runs"] else "(none finished yet)",
        "",
        *kernel_markdown(r),
    ]
    if r.get("carried_over"):
        text[2:2] = [
            f"Carried over from an earlier run (no finished run of theirs in this work dir), with its settings "
            f"{json.dumps(r['carried_over_settings'])}: {', '.join(r['carried_over'])}.",
            "",
        ]
    args.results.mkdir(parents=True, exist_ok=True)
    kernel_chart(r, args.results)
    atomic_write_json(args.results / "quality.json", results)
    atomic_write_text(args.results / "quality.md", "\n".join(text) + "\n")
    return results


# --- entry points ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pieces",
        nargs="*",
        default=["kernel", "probe", "rt", "self-distill", "wnut", "student"],
        choices=["kernel", "probe", "rt", "self-distill", "wnut", "student"],
    )
    p.add_argument(
        "--sources",
        nargs="+",
        default=["package", "dapt"],
        choices=["package", "dapt"],
        help="fine-tune from these (two bench processes can split the work: --threads 1 each)",
    )
    p.add_argument("--kernel-budgets", nargs="+", default=["low", "full"], choices=["low", "full"])
    p.add_argument("--kernel-pretrain-steps", type=int, default=1000, help="DAPT steps of 32 x 128 tokens (~one pass)")
    p.add_argument("--kernel-low-epochs", type=float, default=8.0, help="on train-low.jsonl (801 paragraphs)")
    p.add_argument("--kernel-full-epochs", type=float, default=2.0, help="on train.jsonl (5,945 paragraphs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument(
        "--epochs",
        type=float,
        default=3.0,
        help="RT fine-tuning epochs (best on validation kept); 3: jobs/finetune-sentiment.yaml's",
    )
    p.add_argument("--lr", type=float, default=5e-5, help="RT fine-tuning learning rate")
    p.add_argument("--ner-epochs", type=float, default=5.0)
    p.add_argument("--ner-lr", type=float, default=1e-4)
    p.add_argument(
        "--ensemble-seeds",
        nargs="+",
        type=int,
        default=[1, 2, 3],
        help="self-distill: the seeds of the jobs/finetune-sentiment.yaml runs whose ensemble teaches",
    )
    p.add_argument("--distill-epochs", type=float, default=3.0)
    p.add_argument(
        "--student-teacher",
        choices=["package", "dapt", "self-distill"],
        default="dapt",
        help="the RT fine-tune distilled: dapt = the shipped pipeline's road (pretrain -> finetune -> distill)",
    )
    p.add_argument(
        "--rt-pretrain-steps", type=int, default=150, help="batch 32 x 128 tokens (~1.5 passes over the RT text)"
    )
    p.add_argument("--wnut-pretrain-steps", type=int, default=200)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument(
        "--head-warmup", type=float, default=0.2, help="share of the pretrain steps that train the MLM head alone"
    )
    p.add_argument("--head-lr", type=float, default=1e-3, help="the MLM head's learning rate during its warm-up")
    p.add_argument("--max-train-samples", type=int, default=None, help="first N training rows (smoke runs)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N validation/test rows (smoke runs)")
    p.add_argument("--max-steps", type=int, default=None, help="fine-tune/distill step cap (smoke runs)")
    p.add_argument("--smoke", action="store_true", help="few latency repeats, no int8 search (numbers meaningless)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of each job")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "quality-bench")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return p


def setup(args) -> None:
    knobs = {
        k: v
        for k, v in vars(args).items()
        if k not in ("pieces", "seeds", "sources", "kernel_budgets", "work", "results", "threads")
    }
    args.settings = knobs
    args.work = args.work.resolve()
    args.read_only = False
    need = [
        FULL / "rotten-tomatoes" / "domain.txt",
        FULL / "wnut16" / "domain-tweets.txt",
        FULL / "wnut16" / "test.conll",
    ]
    need = [KERNEL / "stats.json"] + (need if set(args.pieces) - {"kernel", "probe"} else [])
    if missing := [str(p) for p in need if not p.is_file()]:
        raise SystemExit(f"missing {missing}: run `make data` first")


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    setup(args)
    for seed in args.seeds:  # seed by seed: a partial run already has every piece's first seeds
        for piece in args.pieces:
            if piece == "student":
                student(args, seed)
            elif piece == "self-distill":
                self_distill(args, seed)
            elif piece == "probe":
                kernel_probe(args)
            elif piece == "kernel":
                for budget in args.kernel_budgets:
                    for source in args.sources:
                        kernel_finetune(args, budget, source, seed)
            else:
                for source in args.sources:
                    finetune(args, piece, source, seed)
            write(args, collect(args))
    results = write(args, collect(args))
    print(
        f"[quality] {args.results}/quality.json, quality.md: "
        + json.dumps(
            {
                k: results.get(k)
                for k in (
                    "rt_test_macro_f1_mean",
                    "rt_test_macro_f1_std",
                    "rt_student_int8_test_macro_f1_mean",
                    "dapt_effect_rt",
                    "dapt_effect_wnut",
                    "dapt_effect_kernel_low",
                    "dapt_effect_kernel_full",
                    "train_cpu_minutes",
                )
            }
        ),
        flush=True,
    )
    return results


def run() -> dict:
    """`python -m bench --only quality`: every default."""
    return main([])


if __name__ == "__main__":
    main()
