"""`hpcnlp summary`: one table of the metrics.json of several runs (a sweep's tasks, say), with each
sweep task's own overrides."""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

from hpcnlp.report import markdown_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("summary", help="one table of the metrics.json of several runs (e.g. a sweep)")
    p.add_argument("paths", nargs="+", help="run dirs, their parent (a sweep's output_dir) or globs")
    p.add_argument("--keys", help="comma-separated metric keys (dotted for nested), default: all shared")


def main(args: argparse.Namespace) -> int:
    table = summary(args.paths, args.keys.split(",") if args.keys else None)
    if not table:
        print(f"error: no metrics.json under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(table)
    return 0


def flatten(d: dict, prefix: str = "") -> dict:
    """The numbers of a nested mapping, keys dotted."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def find_metrics(paths: list[str]) -> list[Path]:
    found = []
    for pattern in paths:
        for name in sorted(glob.glob(pattern)) or [pattern]:
            p = Path(name)
            if p.name == "metrics.json" and p.is_file():
                found.append(p)
            elif (p / "metrics.json").is_file():
                found.append(p / "metrics.json")
            elif p.is_dir():
                found += sorted(p.glob("*/metrics.json"))
    return list(dict.fromkeys(found))


def sweep_overrides(run: Path) -> str | None:
    """A sweep task's own overrides (its sweep.json, output_dir left out); None for a run of no sweep."""
    m = re.fullmatch(r"task-(\d+)", run.name)
    try:
        tasks = json.loads((run.parent / "sweep.json").read_text())["tasks"] if m else None
        return " ".join(t for t in tasks[int(m[1])] if not t.startswith("output_dir=")) if tasks else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def summary(paths: list[str], keys: list[str] | None = None) -> str:
    rows = []
    for f in find_metrics(paths):
        rows.append(
            {"run": str(f.parent), "overrides": sweep_overrides(f.parent) or "", **flatten(json.loads(f.read_text()))}
        )
    if not rows:
        return ""
    if not keys:  # the numbers every run has, in the first run's order
        keys = [k for k in rows[0] if k not in ("run", "overrides") and all(k in r for r in rows)]
    sweep = ["overrides"] if any(r["overrides"] for r in rows) else []  # which grid point each task is
    return markdown_table(rows, ["run", *sweep, *keys])
