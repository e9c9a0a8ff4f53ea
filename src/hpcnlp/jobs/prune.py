"""`hpcnlp prune`: structured pruning of a fine-tuned classifier, then a short recovery fine-tune.

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): for a gate g on each head's
output and on each FFN neuron, |dL/dg| at g = 1, i.e. |sum over tokens of activation * gradient|, per
example, summed over `importance_samples` training rows. Head scores are normalised per layer (L2) and
ranked globally: `keep_heads` are kept in all, at least one per layer. FFN neurons are ranked per layer
and the same number, `intermediate_size`, is kept in every layer.

Why this shape, so the result reloads with AutoModelFor... and exports like any model:
- heads: transformers' own `prune_heads`, which records `pruned_heads` in config.json; every model
  re-applies it on load, so layers may keep different numbers of heads.
- FFN: BERT-like configs hold ONE `intermediate_size` for all layers, so a model with layers of different
  FFN widths would not reload (and padding them back would give no speed-up). Keeping the same number in
  every layer and writing it to config.json makes a plain model of the same architecture.
- The surgery is transformers' `prune_linear_layer` (slices a Linear's rows/columns). torch-pruning was
  considered: its dependency graph finds the same coupled slices, but it does not update the HF config,
  so its output would not reload with AutoModelFor... either.
Which heads and neurons go is written to `prune_plan.json` first; a resumed run rebuilds the same model.
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
from hpcnlp.config import ConfigError, FinetuneDataConfig, LatencyConfig, Problem, TrainingConfig, TrainingJobConfig
from hpcnlp.models import encoder_layers, load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb
from hpcnlp.runtime.io import atomic_write_json, is_inside
from hpcnlp.spec import JobSpec
from hpcnlp.tasks import (
    auto_model_class,
    batches,
    evaluate,
    label_names,
    latency,
    load_data,
    model_task,
    task_of,
    torch_runner,
)

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class PruneConfig(TrainingJobConfig):
    """Structured pruning of a fine-tuned classifier: the least important attention heads and FFN neurons
    (importance measured on the training data) are removed, then a short recovery fine-tune (listening
    to `teacher`'s logits when given). The result is a plain smaller model of the same architecture."""

    job: Literal["prune"] = "prune"
    model_name_or_path: str  # a fine-tuned classifier (hpcnlp finetune output_dir)
    teacher: str | None = None  # recovery with the distillation loss on its logits; None: gold labels only
    keep_heads: int = Field(ge=1)  # attention heads kept over all layers (ranked globally, >= 1 per layer)
    intermediate_size: int = Field(ge=1)  # FFN neurons kept in every layer (config.json holds one size)
    importance_samples: int = Field(512, ge=1)  # training rows the importance is measured on
    temperature: float = Field(2.0, gt=0)  # with teacher: as in distill
    alpha: float = Field(0.5, ge=0, le=1)
    trust_remote_code: bool = False
    data: FinetuneDataConfig
    latency: LatencyConfig = Field(default_factory=LatencyConfig)  # before vs after, same inputs
    training: TrainingConfig = Field(default_factory=TrainingConfig)  # the recovery fine-tune

    def problems(self) -> list[Problem]:
        return self.training.problems()


# model_type -> (attention output projection, FFN in, FFN out: names inside an encoder layer;
#                config keys of the head count and the FFN width)
_BERT_LIKE = (
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
    "num_attention_heads",
    "intermediate_size",
)
LAYOUT = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    # No MPNet: its prune_heads (transformers 4.57) leaves the relative position bias with every head,
    # so the pruned model's forward fails (seen in tests/test_prune.py).
    "distilbert": ("attention.out_lin", "ffn.lin1", "ffn.lin2", "n_heads", "hidden_dim"),
}


def model_config(cfg: PruneConfig) -> dict | None:
    """The sizes of the pruned model the recovery trains (training.bf16: auto's probe)."""
    return {**(checks.model_config(cfg.model_name_or_path) or {}), "intermediate_size": cfg.intermediate_size}


def check(cfg: PruneConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.training(cfg.training, cfg.output_dir) + checks.resume(cfg)
    out += checks.model("model_name_or_path", cfg.model_name_or_path, pending)
    out += checks.model("teacher", cfg.teacher, pending)
    task = model_task(cfg.model_name_or_path)
    ready = not is_inside(cfg.model_name_or_path, pending) and not any(p.key == "model_name_or_path" for p in out)
    if ready and not tasks.labelled(task):
        out.append(
            Problem(
                key="model_name_or_path",
                message=f"'{cfg.model_name_or_path}' is not a sequence or token classifier",
                fix="point it at a `hpcnlp finetune` output_dir",
            )
        )
    if tasks.labelled(task):
        out += tasks.data_problems(task, cfg.data, pending)
        out += checks.max_seq_length(cfg.data.max_seq_length, "model_name_or_path", cfg.model_name_or_path, pending)
    if ready and tasks.labelled(task):
        out += _size_problems(cfg, checks.model_config(cfg.model_name_or_path) or {})
    if cfg.teacher and not is_inside(cfg.teacher, pending) and task and model_task(cfg.teacher) not in (None, task):
        out.append(
            Problem(
                key="teacher",
                message=f"'{cfg.teacher}' is not a {task} model",
                fix="use the model that was fine-tuned on this data (or null)",
            )
        )
    out += checks.overlaps(
        cfg.output_dir, {"model_name_or_path": cfg.model_name_or_path, "teacher": cfg.teacher, **cfg.data.files()}
    )
    return out + checks.output_dir(cfg, cfg.resume)


def _size_problems(cfg: PruneConfig, config: dict) -> list[Problem]:
    model_type = config.get("model_type")
    if model_type not in LAYOUT:
        return [
            Problem(
                key="model_name_or_path",
                message=f"no pruning recipe for model_type '{model_type}'",
                fix=f"use one of {sorted(LAYOUT)}",
            )
        ]
    *_, heads_key, ffn_key = LAYOUT[model_type]
    layers, heads, ffn = config.get("num_hidden_layers", config.get("n_layers")), config[heads_key], config[ffn_key]
    have = layers * heads - sum(len(v) for v in (config.get("pruned_heads") or {}).values())
    out = []
    if not layers <= cfg.keep_heads <= have:
        out.append(
            Problem(
                key="keep_heads",
                message=f"the model has {have} heads in {layers} layers, cannot keep {cfg.keep_heads}",
                fix=f"use {layers}..{have} (at least one per layer)",
            )
        )
    if cfg.intermediate_size > ffn:
        out.append(
            Problem(
                key="intermediate_size",
                message=f"the model's FFN has {ffn} neurons per layer, cannot keep {cfg.intermediate_size}",
                fix=f"use 1..{ffn}",
            )
        )
    return out


# --- importance ---------------------------------------------------------------------------------
def _module(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def importance(model, ds, samples: int, seed: int, pad_id: int, batch_size: int = 16) -> tuple[list, list]:
    """Per layer: |gate gradient| of each remaining head and of each FFN neuron, summed over examples."""
    import torch

    attn_out, _, ffn_out, heads_key, _ = LAYOUT[model.config.model_type]
    parent, name = encoder_layers(model)
    layers = list(getattr(parent, name))
    heads = [_module(layer, attn_out).in_features // _head_size(model) for layer in layers]
    head_scores = [torch.zeros(h) for h in heads]
    ffn_scores = [torch.zeros(_module(layer, ffn_out).in_features) for layer in layers]

    def hook(scores, n_groups):
        def pre(module, args):
            x = args[0]

            def grad(g):  # returns None: the gradient flows on unchanged
                scores.add_(
                    (x.detach() * g).reshape(x.shape[0], x.shape[1], n_groups, -1).sum((1, 3)).abs().sum(0).cpu()
                )

            if x.requires_grad:
                x.register_hook(grad)

        return pre

    handles = []
    for i, layer in enumerate(layers):
        handles.append(_module(layer, attn_out).register_forward_pre_hook(hook(head_scores[i], heads[i])))
        handles.append(_module(layer, ffn_out).register_forward_pre_hook(hook(ffn_scores[i], ffn_scores[i].numel())))
    rows = ds.shuffle(seed=seed).select(range(min(samples, len(ds))))
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model that will be pruned
    try:
        for inputs, labels in batches(rows, batch_size, pad_id):
            batch = {k: torch.from_numpy(v).to(model.device) for k, v in inputs.items()}
            loss = model(**batch, labels=torch.from_numpy(labels).to(model.device)).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s.tolist() for s in head_scores], [s.tolist() for s in ffn_scores]


def _head_size(model) -> int:
    c = model.config
    hidden = getattr(c, "hidden_size", None) or c.dim
    return hidden // getattr(c, LAYOUT[c.model_type][3])


def plan(model, head_scores: list, ffn_scores: list, keep_heads: int, intermediate_size: int) -> dict:
    """Which original heads to prune per layer, which FFN neurons to keep per layer."""
    pruned = {int(k): set(v) for k, v in (model.config.pruned_heads or {}).items()}
    n_heads = getattr(model.config, LAYOUT[model.config.model_type][3])
    remaining = [[h for h in range(n_heads) if h not in pruned.get(i, set())] for i in range(len(head_scores))]
    normed = [np.asarray(s) / (np.linalg.norm(s) or 1.0) for s in head_scores]  # Michel et al.: per-layer L2
    keep = {(i, int(np.argmax(s))) for i, s in enumerate(normed)}  # at least one head per layer
    ranked = sorted(((float(s[k]), i, k) for i, s in enumerate(normed) for k in range(len(s))), reverse=True)
    for _, i, k in ranked:
        if len(keep) >= keep_heads:
            break
        keep.add((i, k))
    prune_heads = {
        i: [remaining[i][k] for k in range(len(normed[i])) if (i, k) not in keep] for i in range(len(normed))
    }
    neurons = {
        i: sorted(int(j) for j in np.argsort(-np.asarray(s), kind="stable")[:intermediate_size])
        for i, s in enumerate(ffn_scores)
    }
    return {"prune_heads": {i: v for i, v in prune_heads.items() if v}, "keep_neurons": neurons}


def apply_plan(model, p: dict) -> None:
    """Prune in place: heads with transformers' prune_heads, FFN neurons with prune_linear_layer;
    config.json says the new sizes (pruned_heads, intermediate_size / hidden_dim)."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    _, ffn_in, ffn_out, _, ffn_key = LAYOUT[model.config.model_type]
    heads = {int(k): list(v) for k, v in p["prune_heads"].items()}
    if heads:
        model.prune_heads(heads)
    parent, name = encoder_layers(model)
    sizes = set()
    for i, layer in enumerate(getattr(parent, name)):
        index = torch.tensor(p["keep_neurons"][str(i)])  # plans are JSON: layer keys are strings
        for dotted, dim in ((ffn_in, 0), (ffn_out, 1)):  # FFN in: its output rows; FFN out: its input columns
            owner, attr = dotted.rsplit(".", 1)
            owner = _module(layer, owner)
            setattr(owner, attr, prune_linear_layer(getattr(owner, attr), index, dim=dim))
        sizes.add(len(index))
    (size,) = sizes  # one FFN width for every layer: what config.json can say
    setattr(model.config, ffn_key, size)


def head_count(model) -> int:
    c = model.config
    n = getattr(c, LAYOUT[c.model_type][3])
    layers = getattr(c, "num_hidden_layers", None) or c.n_layers
    return layers * n - sum(len(v) for v in (c.pruned_heads or {}).values())


def _plan_for_run(run, cfg: PruneConfig, model, ds, pad_id: int) -> dict:
    """The run's plan: read back when resuming (prune_plan.json), else measured on rank 0 and shared."""
    from hpcnlp.train.harness import from_rank_zero

    path = Path(cfg.output_dir) / "prune_plan.json"
    p = None
    if run.is_main:
        if path.is_file():
            p = json.loads(path.read_text())
            log.info("pruning plan read back from %s", path)
        else:
            head_scores, ffn_scores = importance(model, ds, cfg.importance_samples, run.args.seed, pad_id)
            p = plan(model, head_scores, ffn_scores, cfg.keep_heads, cfg.intermediate_size)
            p = json.loads(json.dumps({**p, "head_importance": head_scores}))  # int keys -> str, like on disk
            atomic_write_json(path, p)
    return from_rank_zero(p)


# --- the job --------------------------------------------------------------------------------------
def run(cfg: PruneConfig) -> int:
    import torch

    from hpcnlp.jobs.distill import trainer_class as distill_trainer
    from hpcnlp.train.harness import ResumableTrainer, TrainingRun

    model_dir = resolve_model_path(cfg.model_name_or_path)
    task = task_of(model_dir)
    names = label_names(model_dir)
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    data = load_data(task, cfg.data, tokenizer, model_dir)  # every row checked before anything is written
    pad = tokenizer.pad_token_id

    run = TrainingRun(cfg, model_config(cfg))
    model = auto_model_class(task).from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    p = _plan_for_run(run, cfg, model, data.splits["train"], pad)
    apply_plan(model, p)
    if head_count(model) != cfg.keep_heads:
        raise ConfigError(
            cfg._source,
            [
                Problem(
                    key="keep_heads",
                    message=f"pruning left {head_count(model)} heads",
                    fix="report this: the plan and the model disagree",
                )
            ],
        )
    eval_ds = data.splits["validation"]
    before_recovery = evaluate(torch_runner(model.eval()), eval_ds, task, names, pad) if run.is_main else None

    collator = tasks.get(task).collator(tokenizer)
    kwargs = dict(
        model=model,
        train_dataset=data.splits["train"],
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
    )
    if cfg.teacher:
        teacher_dir = resolve_model_path(cfg.teacher)
        teacher = auto_model_class(task).from_pretrained(teacher_dir, trust_remote_code=cfg.trust_remote_code)
        trainer = run.trainer(
            distill_trainer(), teachers=[teacher], temperature=cfg.temperature, alpha=cfg.alpha, **kwargs
        )
    else:
        trainer = run.trainer(ResumableTrainer, **kwargs)
    code = run.train()
    if code is not None:
        return code
    run.save()  # a plain model: config.json has pruned_heads and the new FFN width
    if not run.is_main:
        return 0

    pruned = trainer.model.eval()
    original = auto_model_class(task).from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    compare = {}
    for who, m in (("original", original.to(pruned.device).eval()), ("pruned", pruned)):
        runner = torch_runner(m)
        compare[who] = {
            "metrics": evaluate(runner, eval_ds, task, names, pad),
            "parameters": sum(x.numel() for x in m.parameters()),
            "heads": head_count(m),
            "intermediate_size": getattr(m.config, LAYOUT[m.config.model_type][4]),
            "latency": {str(b): latency(runner, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes},
        }
    primary = tasks.get(task).primary_metric
    o_score, s_score = compare["original"]["metrics"][primary], compare["pruned"]["metrics"][primary]
    metrics = {
        "job": "prune",
        "task": task,
        "model_name_or_path": model_dir,
        "teacher": cfg.teacher,
        "metric": primary,
        **compare,
        "before_recovery": before_recovery,
        "retention_pct": round(100 * s_score / o_score, 2) if o_score else None,
        "parameter_ratio": round(compare["pruned"]["parameters"] / compare["original"]["parameters"], 4),
        "speedup": {
            b: round(compare["original"]["latency"][b]["p50_ms"] / compare["pruned"]["latency"][b]["p50_ms"], 2)
            for b in compare["original"]["latency"]
        },
        "pruned_heads": p["prune_heads"],
        "threads": torch.get_num_threads(),
        **run.metrics(),
    }
    rows = [
        {
            "model": who,
            primary: c["metrics"][primary],
            "parameters": f"{c['parameters']:,}",
            "heads": c["heads"],
            "FFN per layer": c["intermediate_size"],
            **{f"p50 ms batch {b}": v["p50_ms"] for b, v in c["latency"].items()},
        }
        for who, c in compare.items()
    ]
    run.write_report(
        f"Structured pruning ({task})",
        metrics,
        [
            ("Original vs pruned", markdown_table(rows)),
            (
                "Summary",
                f"pruned keeps {metrics['retention_pct']}% of the original's {primary} "
                f"({before_recovery[primary]:.4f} before the recovery fine-tune) with "
                f"{metrics['parameter_ratio']:.0%} of its parameters; speed-up (p50) {metrics['speedup']} at seq "
                f"{cfg.latency.seq_length}, {metrics['threads']} thread(s); recovery "
                + (
                    f"with teacher logits (T={cfg.temperature}, alpha={cfg.alpha})" if cfg.teacher else "on gold labels"
                ),
            ),
        ],
        plot_title=f"pruning: {Path(model_dir).name}",
    )
    log.info(
        "pruned %s %.4f vs original %.4f (%.1f%%), %d heads, FFN %d; model and report in %s",
        primary,
        s_score,
        o_score,
        metrics["retention_pct"] or 0,
        compare["pruned"]["heads"],
        compare["pruned"]["intermediate_size"],
        cfg.output_dir,
    )
    return 0


def summary_row(cfg: PruneConfig) -> dict:
    out = Path(cfg.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    metric, s, o = m["metric"], m["pruned"], m["original"]
    row = {
        "metric": f"pruned {metric} {s['metrics'][metric]:.3f} ({m['retention_pct']}% of "
        f"{o['metrics'][metric]:.3f}), heads {s['heads']}/{o['heads']}, FFN {s['intermediate_size']}/"
        f"{o['intermediate_size']}",
        "size": mb(out / "model.safetensors"),
    }
    lat = {who: m[who]["latency"].get("1", {}).get("p50_ms") for who in ("original", "pruned")}
    if all(lat.values()):
        row["latency b1 p50"] = f"{lat['pruned']:.1f} ms (original {lat['original']:.1f} ms)"
    return row


SPEC = JobSpec(
    name="prune",
    order=50,
    resumable=True,
    help="prune attention heads and FFN neurons by importance, recover with a short fine-tune",
    config=PruneConfig,
    check=check,
    run=run,
    summary_row=summary_row,
    model_config=model_config,
)
