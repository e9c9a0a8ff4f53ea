"""Where a pretraining step's time goes, fp32 vs bf16, at block 128 and 512 (issue #31: why bf16 gained less
at 512), and what the two levers it found change.

A step = forward, backward and AdamW step of the pretrain job's model (MiniLM-L6, sparse MLM head, SDPA
attention) on a batch of the bench's shape (8 x 128 or 2 x 512 tokens): the mean of 3 profiled steps after 2 of
warm-up, in fp32, in bf16 (the Trainer's autocast) with torch's SDPA as is, and in bf16 with SDPA in fp32 (what
jobs run: train/precision.attention_in_fp32); with the model's attention dropout (0.1) and pretrain's default
(attention_dropout: 0). torch.profiler's self CPU time per op is summed into groups (matmuls, attention, dropout
masks, dtype casts, ...) so the variants compare group by group.

    python -m bench.profile_step          # -> bench/results/profile_step.{json,md}, ~2 min
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "outputs" / "bench"
# op name patterns -> group (first match wins); self time of everything else is "other"
GROUPS = [
    ("attention (SDPA)", r"scaled_dot_product|_flash_attention|_efficient_attention|attention_math"),
    ("matmul (linear/mm/bmm)", r"^aten::(addmm|mm|bmm|matmul|linear|_mkldnn|mkldnn_)|onednn|mkldnn"),
    ("optimizer (AdamW)", r"_foreach_|^Optimizer\.|adam"),
    ("dtype casts (autocast)", r"^aten::(_to_copy|to|copy_|_autocast)"),
    ("dropout masks (bernoulli)", r"bernoulli|dropout"),
    ("softmax/GELU/LayerNorm", r"softmax|gelu|layer_norm"),
    ("embedding/gather/index (MLM head rows)", r"embedding|index|gather|masked_select|nonzero|scatter"),
    ("loss (cross-entropy)", r"nll_loss|log_softmax|cross_entropy"),
    ("elementwise (add/mul/...)", r"^aten::(add|mul|div|sub|where|fill_|zero_|ones|zeros|empty|clone|sum)"),
]


def _group(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


VARIANTS = {  # name -> (bf16 autocast, SDPA in fp32 as precision.attention_in_fp32 runs it)
    "fp32": (False, False),
    "bf16, stock SDPA": (True, False),
    "bf16, SDPA in fp32 (jobs)": (True, True),
}


def profile(block: int, batch: int, variant: str, attention_dropout: float | None, warmup: int = 2, steps: int = 3):
    """Self CPU ms per op group, the mean of `steps` profiled steps after `warmup` ones."""
    import torch.nn.functional as F

    from hpcnlp.train import precision

    bf16, fp32_attention = VARIANTS[variant]
    stock = getattr(F.scaled_dot_product_attention, "__wrapped__", F.scaled_dot_product_attention)
    F.scaled_dot_product_attention = stock
    if fp32_attention:
        precision.attention_in_fp32()
    try:
        return _profile(block, batch, bf16, attention_dropout, warmup, steps) | {"variant": variant}
    finally:
        F.scaled_dot_product_attention = stock


def _profile(block: int, batch: int, bf16: bool, attention_dropout: float | None, warmup: int, steps: int) -> dict:
    from transformers import set_seed

    from bench.pretrain import corpus_config
    from hpcnlp.data.pack import prepare
    from hpcnlp.jobs.pretrain import PretrainConfig
    from hpcnlp.models import load_tokenizer
    from hpcnlp.train.mlm import MLMCollator, build_masked_lm, enable_sparse_mlm_head

    tokenizer = load_tokenizer("minilm-l6")
    data = prepare(corpus_config(block, str(WORK)), tokenizer).load()["train"]
    cfg = PretrainConfig(
        output_dir=str(WORK / "out"), data=corpus_config(block, str(WORK)), attention_dropout=attention_dropout
    )
    set_seed(42)
    model = build_masked_lm(cfg, tokenizer)
    enable_sparse_mlm_head(model)
    model.train()
    collator = MLMCollator(tokenizer, cfg.mlm_probability, cfg.whole_word_masking, 42)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [collator([data[i * batch + j] for j in range(batch)]) for i in range(warmup + steps)]

    def step(b: dict) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:warmup]:
        step(b)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for b in batches[warmup:]:
            step(b)
    groups: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1000 / steps
        groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + ms
        ops[e.key] = ms
    total = sum(groups.values())
    return {
        "block": block,
        "batch": batch,
        "dtype": "bf16" if bf16 else "fp32",
        "attention_dropout": model.config.attention_probs_dropout_prob
        if attention_dropout is None
        else attention_dropout,
        "threads": torch.get_num_threads(),
        "step_ms": round(total, 1),
        "groups_ms": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {k: round(v, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]},
    }


def run() -> dict:
    from hpcnlp.tasks import cpu as cpu_info

    runs = [
        profile(block, batch, variant, dropout)
        for dropout in (None, 0.0)  # the model's own attention dropout (0.1), then pretrain's default
        for block, batch in ((128, 8), (512, 2))
        for variant in VARIANTS
    ]
    return {"machine": {**cpu_info(), "torch": torch.__version__}, "runs": runs}


def markdown(res: dict) -> str:
    from hpcnlp.tasks import cpu_text

    out = [
        "# One pretraining step, profiled (bench/profile_step.py)",
        "",
        f"{cpu_text(res['machine'])}, torch {res['machine']['torch']}, {res['runs'][0]['threads']} thread(s). "
        "Self CPU ms per group of ops (torch.profiler), per step (forward, backward, AdamW): the mean of 3 steps "
        "after 2 of warm-up. bf16 is the Trainer's autocast; jobs run SDPA in fp32 under it "
        "(train/precision.attention_in_fp32).",
    ]
    for p in sorted({r["attention_dropout"] for r in res["runs"]}, reverse=True):
        out += ["", f"## attention dropout {p}", "", _table([r for r in res["runs"] if r["attention_dropout"] == p])]
    return "\n".join(out) + "\n"


def _table(runs: list[dict]) -> str:
    groups = sorted(
        {g for r in runs for g in r["groups_ms"]}, key=lambda g: -max(r["groups_ms"].get(g, 0) for r in runs)
    )
    head = [f"{r['variant']}, {r['batch']}x{r['block']}" for r in runs]
    fp32 = {r["block"]: r["step_ms"] for r in runs if r["variant"] == "fp32"}
    lines = ["| group | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines.append(
        "| **step, speed-up vs fp32** | " + " | ".join(f"{fp32[r['block']] / r['step_ms']:.2f}x" for r in runs) + " |"
    )
    for g in ["step total", *groups]:
        vals = [r["step_ms"] if g == "step total" else r["groups_ms"].get(g, 0.0) for r in runs]
        lines.append(f"| {g} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    for r in runs:
        lines += ["", f"Top ops, {r['variant']}, {r['batch']}x{r['block']}: "]
        lines.append(", ".join(f"{k} {v}" for k, v in list(r["top_ops_ms"].items())[:8]))
    return "\n".join(lines)


if __name__ == "__main__":
    out = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_step.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "profile_step.md").write_text(markdown(out))
    sys.stdout.write(markdown(out))
