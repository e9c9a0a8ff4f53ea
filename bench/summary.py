"""summary.json (ratios + every case), summary.md (tables) and the PNG charts."""

from __future__ import annotations

from pathlib import Path

from bench.large import chart as large_chart
from bench.large import table as large_table
from bench.timing import mfu
from hpcnlp.report import markdown_table, save_figure
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text

PRETRAIN = [
    ("pretrain_hpcnlp_128", "hpcnlp: packed 128, sparse MLM head", "pretrain_run_mlm_128"),
    ("pretrain_run_mlm_128", "run_mlm.py style: group_texts 128, stock", None),
    ("pretrain_hpcnlp_512", "hpcnlp: packed 512, sparse MLM head", "pretrain_run_mlm_512"),
    ("pretrain_run_mlm_512", "run_mlm.py style: group_texts 512, stock", None),
    ("pretrain_hpcnlp_256", "hpcnlp: packed 256, sparse MLM head", None),
    ("pretrain_seed_recipe", "seeds' recipe: each line padded to 512, stock", None),
    ("pretrain_hpcnlp_bf16_128", "hpcnlp bf16: packed 128, sparse MLM head", "pretrain_run_mlm_128"),
    ("pretrain_hpcnlp_bf16_512", "hpcnlp bf16: packed 512, sparse MLM head", "pretrain_run_mlm_512"),
    ("pretrain_bert_base_128", "BERT-base size fp32: packed 128, sparse head", None),
    ("pretrain_bert_base_bf16_128", "BERT-base size bf16: packed 128, sparse head", "pretrain_bert_base_128"),
]
FINETUNE = [
    ("finetune_hpcnlp", "hpcnlp: dynamic padding + group_by_length"),
    ("finetune_run_glue", "run_glue.py style: pad to 128"),
    ("finetune_seed_recipe", "seeds' recipe: pad to 512"),
    ("finetune_hpcnlp_bf16", "hpcnlp bf16: dynamic padding + group_by_length"),
]


def _ok(results: dict, name: str) -> dict | None:
    r = results.get(name)
    return r if r and "error" not in r else None


def tables(summary: dict) -> str:
    res = summary["results"]
    peak = _ok(res, "matmul_peak") or {}
    out = [
        f"Machine: {summary['machine']}. 2048x2048 torch.mm peak (same run, {peak.get('threads')} thread): "
        f"fp32 {peak.get('gflops')} GFLOP/s, bf16 {peak.get('gflops_bf16')} GFLOP/s. MFU: against the peak "
        "of the dtype trained in; MFU best: against the faster dtype's peak.",
        "",
        "Rates are per CPU second of the (1-thread) process, so neighbours on a shared machine do not "
        "skew the ratios; wall-clock rates of the same steps are shown too.",
        "",
    ]
    out += ["### Ratios", "", markdown_table([{"ratio": k, "value": v} for k, v in summary["ratios"].items()]), ""]

    rows = []
    base_of = lambda k: "lever_bf16_base" if k.startswith("lever_bf16_") else "lever_base"  # noqa: E731
    levers = [(k, k, None if k.endswith("_base") else base_of(k)) for k in res if k.startswith("lever_")]
    for name, label, vs in PRETRAIN + levers:
        r = _ok(res, name)
        if r is None:
            rows.append({"recipe": label, "real tokens/s": res.get(name, {}).get("error", "not run")[:60]})
            continue
        base = _ok(res, vs) if vs else None
        rows.append(
            {
                "recipe": label,
                "real tokens/s": r["tokens_per_second"],
                "vs baseline": f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "",
                "wall tokens/s": r.get("wall_tokens_per_second", ""),
                "step s": r["step_seconds_median"],
                "padding": f"{100 * r['padding_share']:.0f}%",
                "MFU": mfu(r, peak).get("mfu", ""),
                "MFU best": mfu(r, peak).get("mfu_best_dtype", ""),
                "eval CPU s": r.get("eval_cpu_seconds", ""),
                "peak RSS MB": r["peak_rss_mb"],
                "eval loss": r["eval_loss"],
                "steps x batch": f"{r['steps']} x {r['batch_size']}",
            }
        )
    out += [
        "### Pretraining (MiniLM-L6 unless named, Python docs; eval loss on the same held-out masked tokens)",
        "",
        markdown_table(rows),
        "",
    ]

    rows = []
    for name, label in FINETUNE:
        r = _ok(res, name)
        if r is None:
            rows.append({"recipe": label, "samples/s": res.get(name, {}).get("error", "not run")[:60]})
            continue
        rows.append(
            {
                "recipe": label,
                "samples/s": r["samples_per_second"],
                "wall samples/s": r.get("wall_samples_per_second", ""),
                "padding": f"{100 * r['padding_share']:.0f}%",
                "peak RSS MB": r["peak_rss_mb"],
                "eval accuracy": r["eval_accuracy"],
                "eval loss": r["eval_loss"],
                "steps x batch": f"{r['steps']} x {r['batch_size']}",
            }
        )
    out += ["### Fine-tuning (Rotten Tomatoes sentences, batch 16)", "", markdown_table(rows), ""]

    rows = [
        {
            "corpus": f"x{r['times']}",
            "num_proc": r["num_proc"],
            "tokens": r["tokens"],
            "tokens/s": r["tokens_per_second"],
            "peak RSS MB": r["peak_rss_mb"],
            "RSS before data MB": r["rss_before_mb"],
        }
        for k, r in sorted(res.items(), key=lambda kv: (kv[1].get("times", 0), kv[1].get("num_proc", 0)))
        if k.startswith("prepare_") and "error" not in r
    ]
    out += ["### prepare (tokenize + pack 128)", "", markdown_table(rows), ""]
    large = large_table(res)
    if large:
        out += ["### Large corpus: Linux kernel source (bench/large.py)", "", markdown_table(large), ""]
    gpu = summary["gpu"] or {
        **{k: res.get(k) for k in ("gpu_matmul_peak", "gpu_bert_base_128")},
        "mfu_vs_gpu_bf16_peak": mfu(_ok(res, "gpu_bert_base_128"), _ok(res, "gpu_matmul_peak")),
    }
    out += ["### GPU (BERT-base, bf16, packed 128, sparse head)", "", f"{gpu}", ""]
    if "onnx_latency" in res:
        r = res["onnx_latency"]
        out += [
            "### ONNX latency (bench/onnx_latency.py; seq 128, p50)",
            "",
            f"not measured: {r['error']}: {' '.join(r.get('log_tail', [])[-1:])}" if "error" in r else onnx_table(r),
            "",
        ]
    return "\n".join(out)


def onnx_table(r: dict) -> str:
    rows = []
    for model in ("teacher", "student"):
        m = r[model]
        for variant in ("pytorch", "pytorch_bf16", "onnx_fp32", "onnx_int8"):
            if variant not in m:
                continue
            v = m[variant]
            rows.append(
                {
                    "model": model,
                    "runtime": variant,
                    "accuracy": v["accuracy"],
                    "f1": v["f1"],
                    "batch 1 ms": v["batch1"]["p50_ms"],
                    "batch 32 ms": v["batch32"]["p50_ms"],
                    "speed-up b1 vs PyTorch": m["speedup_vs_pytorch"].get(variant, {}).get("1", 1.0),
                    "int8 recipe shipped": _recipe(m) if variant == "onnx_int8" else "",
                    "int8 vs best fp32 b1": m.get("int8_vs_best_fp32", {}).get("1", "")
                    if variant == "onnx_int8"
                    else "",
                    "int8 vs PyTorch bf16 b1": m.get("int8_vs_pytorch_bf16", {}).get("1", "")
                    if variant == "onnx_int8"
                    else "",
                }
            )
    sv = r["student_vs_teacher"]
    fp32_alone = [
        f"{model}: {r[model]['int8_reason']}" for model in ("teacher", "student") if r[model].get("int8_reason")
    ]
    return (
        markdown_table(rows) + f"\n\nStudent vs teacher (PyTorch): {sv['speedup_pytorch']['1']}x at batch 1, "
        f"{sv['speedup_pytorch']['32']}x at batch 32, F1 retention {sv['f1_retention_pct']}%, threads "
        f"{r['teacher']['threads']}. Targets met: {r['targets']}"
        + "".join(f"\n\nint8 not shipped, {why}" for why in fp32_alone)
        + _skip_layernorm(r)
    )


def _skip_layernorm(r: dict) -> str:
    us = r.get("ort_skip_layernorm_us")
    if not us:
        return ""
    return (
        f"\n\nonnxruntime's fused SkipLayerNormalization on this CPU: {us['fused']} us vs {us['plain']} us as "
        "Add + LayerNormalization (1 x 128 x 384, 1 thread); sessions keep the two ops on CPU."
    )


def _recipe(m: dict) -> str:
    """The int8 recipe validate shipped (bench/onnx_latency.py) and the preset; the recipe's name already says
    how many MatMuls it splits, quantizes blockwise and keeps in fp32."""
    return f"{m.get('int8_recipe')} ({m['int8_preset']})"


def charts(summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, names = summary["results"], []
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    pre = [
        (
            label.split(":")[0] + ("\n" + label.split(": ")[1][:22] if ": " in label else ""),
            _ok(res, n)["tokens_per_second"],
        )
        for n, label, _ in PRETRAIN
        if _ok(res, n)
    ]
    if pre:
        a.barh(*zip(*pre))
        a.set_xlabel("real (non-pad) tokens/s")
        a.set_title("MLM pretraining throughput")
    ft = [
        (label.split(":")[0] + "\n" + label.split(": ")[1], _ok(res, n)["samples_per_second"])
        for n, label in FINETUNE
        if _ok(res, n)
    ]
    if ft:
        b.barh(*zip(*ft))
        b.set_xlabel("samples/s")
        b.set_title("fine-tuning throughput")
    save_figure(fig, out / "throughput.png")
    names.append("throughput.png")

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    prep = sorted(
        (r["times"], r["tokens_per_second"], r["peak_rss_mb"])
        for k, r in res.items()
        if k.startswith("prepare_") and "error" not in r and r["num_proc"] == 1
    )
    if prep:
        x, tps, rss = zip(*prep)
        a.plot(x, tps, "o-")
        a.set(
            xscale="log", xlabel="corpus size (x shipped)", ylabel="tokens/s", title="prepare: throughput (wall clock)"
        )
        b.plot(x, rss, "o-")
        b.set(
            xscale="log",
            xlabel="corpus size (x shipped)",
            ylabel="peak RSS MB",
            title="prepare: peak memory",
            ylim=(0, max(rss) * 1.3),
        )
    blocks = [(blk, _ok(res, f"pretrain_hpcnlp_{blk}")) for blk in (128, 256, 512)]
    blocks = [(blk, r["step_seconds_median"]) for blk, r in blocks if r]
    if blocks:
        c.plot(*zip(*blocks), "o-")
        c.set(
            xlabel="block size (1024 tokens per step)",
            ylabel="seconds per step",
            title="pretrain: step time",
            ylim=(0, max(s for _, s in blocks) * 1.3),
        )
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    save_figure(fig, out / "scaling.png")
    names.append("scaling.png")
    if large := large_chart(res, out):
        names.append(large)
    return names


def write(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images = charts(summary, out)
    body = ["# hpcnlp benchmark (`make bench`)", "", tables(summary), ""] + [f"![{i}]({i})" for i in images]
    atomic_write_text(out / "summary.md", "\n".join(body) + "\n")
    atomic_write_json(out / "summary.json", summary)
