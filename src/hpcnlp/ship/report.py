"""A bundle's reports: validation.md (the gate, parity, metrics, latency, the int8 recipes tried, the edge
cases, the out-of-domain eval sets), validation.json (every measurement), latency.png,
validate.resolved.yaml and MODEL_CARD.md (hpcnlp.ship.card)."""

from __future__ import annotations

import json
from pathlib import Path

from hpcnlp import tasks
from hpcnlp.config import dump_config
from hpcnlp.report import markdown_table, save_figure
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text
from hpcnlp.ship import card
from hpcnlp.ship.edge_cases import PAIR_TEXT
from hpcnlp.tasks import cpu_text


def report_sections(results: dict) -> list[str]:
    """validation.md sections of the int8 recipe search, the edge cases and the out-of-domain eval sets."""
    primary = tasks.get(results["task"]).primary_metric
    out = []
    int8 = results.get("int8")
    if int8:
        rows = [
            {
                "recipe": a["recipe"],
                f"{primary} drop": a["metric_drop"],
                "flip rate": round(1 - a["argmax_agreement"], 4),
                "edge-case flip rate": round(1 - a["edge_argmax_agreement"], 4),
                "batch-1 p50 ms": a["latency_b1_p50_ms"],
                "passed": a["passed"],
                "failed": ", ".join(a["failed"]) or "-",
            }
            for a in int8["attempts"]
        ]
        if int8["recipe"]:
            split = ", ".join(
                f"`{n}` (channels {', '.join(map(str, c))})" for n, c in int8.get("split_nodes", {}).items()
            )
            verdict = (
                f"Shipped as model.int8.onnx: **{int8['recipe']}**, batch-1 p50 "
                f"{int8['latency_b1_p50_ms']} ms."
                + (f" MatMuls split, their outlier input channels in fp32: {split}." if split else "")
                + "".join(
                    f" MatMuls {how}: {', '.join(f'`{n}`' for n in int8[key])}."
                    for key, how in (("blockwise_nodes", "quantized blockwise"), ("fp32_nodes", "kept in fp32"))
                    if int8.get(key)
                )
            )
        else:
            verdict = f"**No int8 model ships**: {int8['reason']}."
        probe, probe_line = int8.get("blockwise_probe"), ""
        if probe:
            probe_line = (
                f" Sensitive MatMuls {'blockwise' if probe['blockwise'] else 'in fp32'}: `{probe['node']}` alone "
                f"took {probe['fp32_us']} us in fp32, {probe['blockwise_us']} us blockwise 8-bit."
            )
        out += [
            "## int8 recipes tried",
            "",
            f"In order, flip rate vs PyTorch on the whole eval set; search stopped: {int8['search_stopped']}."
            + probe_line,
            "",
            markdown_table(rows),
            "",
            verdict,
            "",
        ]
    if "edge_cases" in results:
        rows = []
        for c in results["edge_cases"]:
            row = {"case": c["case"], "text": json.dumps(c["text"], ensure_ascii=False), "tokens": c["tokens"]}
            for k in ("onnx_fp32", "onnx_int8"):
                if k in c:
                    row[f"{k} max abs diff"] = c[k].get("max_abs_diff", c[k].get("error"))
                    row[f"{k} argmax agrees"] = f"{c[k]['agree']}/{c[k]['compared']}"
            rows.append(row)
        out += [
            "## Edge cases (gated)",
            "",
            "Each input alone (no padding), truncated to data.max_seq_length; "
            "ONNX vs PyTorch."
            + (f" Pairs: second text {json.dumps(PAIR_TEXT)}." if results["edge_cases"][0].get("pair") else ""),
            "",
            markdown_table(rows),
            "",
        ]
    if results.get("extra_eval"):
        rows = [
            {
                "eval set": name,
                "file": e["file"],
                "examples": e["examples"],
                **{k: m.get(primary) for k, m in e["metrics"].items()},
            }
            for name, e in {
                "in-domain": {
                    "file": results["eval_file"],
                    "examples": results["eval_examples"],
                    "metrics": results["metrics"],
                },
                **results["extra_eval"],
            }.items()
        ]
        out += [
            "## Out-of-domain eval sets (reported, not gated)",
            "",
            f"{primary} per model.",
            "",
            markdown_table(rows),
            "",
        ]
    return out


# int8 below this speed-up over fp32 at every batch size is called out: on CPUs without int8 dot products
# (no VNNI, no AMX) it measured 1.0x (docs/performance.md), and buys size only.
INT8_PAYS = 1.1


def int8_speedup(lat: dict) -> str:
    """One line: ONNX int8's p50 speed-up over fp32 per batch size, and a warning where it is not faster."""
    fp32, int8 = lat.get("onnx_fp32", {}), lat.get("onnx_int8", {})
    ratios = {b: fp32[b]["p50_ms"] / int8[b]["p50_ms"] for b in fp32 if b in int8 and int8[b]["p50_ms"] > 0}
    if not ratios:
        return ""
    line = "ONNX int8 vs fp32 (p50): " + ", ".join(f"batch {b} {r:.2f}x" for b, r in ratios.items()) + "."
    if max(ratios.values()) < INT8_PAYS:
        line += (
            " **int8 is not faster than fp32 on this CPU** (int8 dot products need VNNI or AMX): it buys a smaller"
            " file, not speed; serve model.onnx here, or measure on the serving CPU."
        )
    return line


def plot_latency(lat: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({int(b) for v in lat.values() for b in v})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), squeeze=False)
    for ax, b in zip(axes[0], sizes):
        variants = [v for v in lat if str(b) in lat[v]]
        p50 = [lat[v][str(b)]["p50_ms"] for v in variants]
        p95 = [lat[v][str(b)]["p95_ms"] for v in variants]
        ax.bar(variants, p50, label="p50")
        ax.scatter(variants, p95, color="black", marker="_", s=300, label="p95", zorder=3)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("ms per batch")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def write_reports(out: Path, cfg, task: str, names: list[str], results: dict, passed: bool) -> None:
    """validation.md, validation.json, latency.png, validate.resolved.yaml and MODEL_CARD.md into `out` (the
    staged bundle). cfg: validate's config."""
    lat_rows = [
        {"model": k, "batch": int(b), **v, "threads": results["threads"]}
        for k, per in results["latency"].items()
        for b, v in per.items()
    ]
    par_rows = [
        {
            "model": k,
            **{f"max abs diff {n}": d for n, d in v["max_abs_diff"].items()},
            "argmax agreement": v["argmax_agreement"],
            "compared": v["compared"],
        }
        for k, v in results["parity"].items()
    ]
    met_rows = [{"model": k, **v} for k, v in results["metrics"].items()]
    speedup = int8_speedup(results["latency"])
    plot_latency(
        results["latency"],
        out / "latency.png",
        f"{cfg.name} {cfg.version}: latency at seq {cfg.latency.seq_length}, {results['threads']} thread(s)",
    )
    body = [
        f"# Validation of {cfg.name} {cfg.version}: {'PASSED' if passed else 'FAILED'}",
        "",
        f"Reference: PyTorch `{cfg.model_name_or_path}`; ONNX from `{cfg.onnx_dir}`; onnxruntime providers "
        f"{results['providers']}.",
        "",
        "## Gate",
        "",
        markdown_table(results["checks"]),
        "",
        f"## Parity on {results['parity_examples']} eval examples",
        "",
        markdown_table(par_rows),
        "",
        f"## Task metrics on the whole eval set ({results['eval_examples']} examples of {results['eval_file']})",
        "",
        markdown_table(met_rows),
        "",
        *(
            [
                f"## Task metrics on the held-out test set ({results['test_examples']} examples of "
                f"{results['test_file']}; not gated)",
                "",
                markdown_table([{"model": k, **v} for k, v in results["test_metrics"].items()]),
                "",
            ]
            if "test_metrics" in results
            else []
        ),
        f"## Latency (inputs padded to {cfg.latency.seq_length} tokens, {cfg.latency.repeats} runs)",
        "",
        f"CPU: {cpu_text(results['cpu'])}",
        "",
        markdown_table(lat_rows),
        "",
        *([speedup, ""] if speedup else []),
        "![latency](latency.png)",
        "",
    ] + report_sections(results)
    atomic_write_text(out / "validation.md", "\n".join(body))
    atomic_write_json(out / "validation.json", results)
    atomic_write_text(out / "validate.resolved.yaml", dump_config(cfg))
    atomic_write_text(out / "MODEL_CARD.md", card.model_card(cfg, out, task, names, results, passed))
