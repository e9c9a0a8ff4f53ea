"""Per-job report: metrics.json, report.md and PNG plots, written atomically by rank 0."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from hpcnlp.runtime import env
from hpcnlp.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def plot_loss(log_history: list[dict], path: Path, title: str) -> Path | None:
    """Train and eval loss against step, from Trainer.state.log_history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def mb(*files: Path) -> str:
    """Sizes of the files that exist, e.g. '86.7 MB / 22.0 MB'."""
    return " / ".join(f"{f.stat().st_size / 2**20:.1f} MB" for f in files if f.is_file())


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    output_dir: str | Path, title: str, metrics: dict, sections: list[tuple[str, str]], images: list[str] = ()
) -> None:
    """metrics.json last: its presence marks a finished job (config checks look for it). It says which
    code made it (code_version: see hpcnlp.runtime.env)."""
    out = Path(output_dir)
    metrics = {**metrics, "code_version": env.code_version()}
    body = [f"# {title}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    body += [f"![{Path(i).stem}]({i})" for i in images]
    body += [
        "",
        "## metrics.json",
        "",
        "```json",
        json.dumps(metrics, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(body))
    atomic_write_json(out / "metrics.json", metrics)
