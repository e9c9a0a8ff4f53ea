"""`hpcnlp summary`: one table of the metrics.json of several runs (a sweep's tasks, say), with each
sweep task's own overrides.

A grid sweep with seeds (`hpcnlp sweep --grid ... --seeds ...`): one row per grid point, each metric
mean ± std over its seeds (and n), the points read from the sweep's manifest. --plot: summary.png in the
sweep's output_dir, a metric against each swept key (seeds as error bars); --tensorboard: one HParams run
per task in <output_dir>/hparams/task-<i>/, for `tensorboard --logdir <output_dir>/hparams`.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import statistics
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.cluster.sweep import LATEST, grid_value
from hpcnlp.report import markdown_table, save_figure
from hpcnlp.runtime import stack

PLOT = "summary.png"
HPARAMS = "hparams"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("summary", help="one table of the metrics.json of several runs (e.g. a sweep)")
    p.add_argument("paths", nargs="+", help="run dirs, their parent (a sweep's output_dir) or globs")
    p.add_argument("--keys", help="comma-separated metric keys (dotted for nested), default: all shared")
    p.add_argument(
        "--plot",
        action="store_true",
        help=f"also write <sweep output_dir>/{PLOT}: the first of --keys (default: the job's primary metric) "
        "against each swept key, seeds as error bars",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help=f"also write each task's grid point and metrics as TensorBoard HParams into <sweep output_dir>/{HPARAMS}",
    )


def main(args: argparse.Namespace) -> int:
    keys = args.keys.split(",") if args.keys else None
    s = collect(args.paths, keys)
    if not s.runs:
        print(f"error: no metrics.json under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    wanted = [flag for flag, on in (("--plot", args.plot), ("--tensorboard", args.tensorboard)) if on]
    if wanted and not stack.installed():  # matplotlib and torch's SummaryWriter come with the training stack
        print(f"error: {' and '.join(wanted)} need(s) the training stack: pip install hpcnlp[train]", file=sys.stderr)
        return 2
    if wanted and not s.sweep_dir:
        print(f"error: {' and '.join(wanted)} take the runs of one sweep (its output_dir)", file=sys.stderr)
        return 2
    print(s.table())
    if args.plot:
        metric = s.primary_key(explicit=bool(keys))
        if not s.swept or not any(metric in r.metrics for r in s.runs):
            why = f"no run has {metric}" if s.swept else "the sweep varies nothing but the seed"
            print(f"error: --plot: {why}", file=sys.stderr)
            return 2
        print(f"summary: wrote {plot(s, metric, s.sweep_dir / PLOT)}", file=sys.stderr)
    if args.tensorboard:
        out = write_hparams(s, s.sweep_dir / HPARAMS)
        print(f"summary: wrote the HParams of {len(s.runs)} runs, see: tensorboard --logdir {out}", file=sys.stderr)
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
                found += sorted(p.glob("*/metrics.json"), key=_task_order)
    return list(dict.fromkeys(found))


def _task_order(metrics: Path) -> tuple:
    """task-2 before task-10; other runs by name."""
    m = re.fullmatch(r"task-(\d+)", metrics.parent.name)
    return (0, int(m[1]), "") if m else (1, 0, metrics.parent.name)


def _manifest(sweep_dir: Path) -> dict | None:
    try:
        body = json.loads((sweep_dir / LATEST).read_text())
        return body if isinstance(body.get("tasks"), list) else None
    except (OSError, ValueError, AttributeError):
        return None


def sweep_task(run: Path) -> tuple[Path, dict, int] | None:
    """(sweep dir, its manifest, task index) of a sweep task's run dir; None for a run of no sweep."""
    m = re.fullmatch(r"task-(\d+)", run.name)
    manifest = _manifest(run.parent.absolute()) if m else None
    if manifest is None or int(m[1]) >= len(manifest["tasks"]):
        return None
    return run.parent.absolute(), manifest, int(m[1])


def sweep_overrides(run: Path) -> str | None:
    """A sweep task's own overrides (its sweep.json, output_dir left out); None for a run of no sweep."""
    task = sweep_task(run)
    if task is None:
        return None
    _, manifest, i = task
    return " ".join(t for t in manifest["tasks"][i] if not t.startswith("output_dir="))


def task_point(manifest: dict, i: int) -> dict:
    """A task's grid point: the manifest's (a --grid sweep), else its overrides read as values."""
    points = manifest.get("points")
    if isinstance(points, list) and i < len(points):
        return points[i]
    import yaml

    point = {}
    for item in manifest["tasks"][i]:
        key, _, text = item.partition("=")
        if key != "output_dir":
            try:
                point[key] = grid_value(yaml.safe_load(text))
            except yaml.YAMLError:
                point[key] = text
    return point


@dataclass
class Run:
    path: Path
    raw: dict  # metrics.json as written
    metrics: dict  # its numbers, keys dotted
    overrides: str = ""
    sweep: Path | None = None
    point: dict = field(default_factory=dict)


@dataclass
class Group:
    """The runs of one grid point (its seeds)."""

    sweep: Path | None
    point: dict  # the swept keys but the seed
    runs: list[Run]

    def stats(self, key: str) -> tuple[float, float, int] | None:
        """(mean, sample std, n) of a metric over the group's runs that have it."""
        values = [r.metrics[key] for r in self.runs if key in r.metrics]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


@dataclass
class Summary:
    runs: list[Run]
    keys: list[str]  # metric keys, dotted
    swept: list[str]  # the swept keys but the seed (a sweep's grid; one sweep only)
    seed_key: str | None  # set: every run is a task of a grid with seeds, one row per point
    sweep_dir: Path | None  # the one sweep all runs belong to

    def groups(self) -> list[Group]:
        found: dict[tuple, Group] = {}
        for r in self.runs:
            point = {k: v for k, v in r.point.items() if k != self.seed_key}
            ident = (r.sweep, json.dumps(point, sort_keys=True, default=str)) if r.sweep else (r.path, "")
            found.setdefault(ident, Group(r.sweep, point, [])).runs.append(r)
        return list(found.values())

    def table(self) -> str:
        if not self.seed_key:  # one row per run
            rows = [{"run": str(r.path), "overrides": r.overrides, **r.metrics} for r in self.runs]
            sweep = ["overrides"] if any(r.overrides for r in self.runs) else []  # which grid point each task is
            return markdown_table(rows, ["run", *sweep, *self.keys])
        groups = self.groups()
        many = len({g.sweep for g in groups}) > 1
        swept = list(dict.fromkeys(k for g in groups for k in g.point))
        rows = []
        for g in groups:
            row = {"sweep": str(g.sweep), **{k: _cell(v) for k, v in g.point.items()}, "n": len(g.runs)}
            for key in self.keys:
                s = g.stats(key)
                row[key] = "" if s is None else f"{s[0]:.4g} ± {s[1]:.2g}" if s[2] > 1 else f"{s[0]:.4g}"
            rows.append(row)
        return markdown_table(rows, [*(["sweep"] if many else []), *swept, "n", *self.keys])

    def primary_key(self, explicit: bool = False) -> str:
        """The metric to plot: the first of --keys, else the job's primary metric among the shared keys:
        the one it picked its best checkpoint by (training.metric_for_best_model, on the validation set),
        its task's (eval.validation.accuracy, f1; distill: student.metrics.*), a pretrain's
        eval_after.perplexity; else the first key."""
        if explicit or not self.keys:
            return self.keys[0] if self.keys else ""
        import yaml

        from hpcnlp import tasks

        try:
            resolved = yaml.safe_load((self.runs[0].path / "config.resolved.yaml").read_text())
            best = resolved["training"]["metric_for_best_model"].removeprefix("eval_")
        except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError):
            best = None
        task = self.runs[0].raw.get("task")
        primary = tasks.get(task).primary_metric if task in tasks.names() else None
        candidates = [f"eval.validation.{best}"] if best else []
        for m in [primary] if primary else []:
            candidates += [
                f"{where}.{m}" for where in ("eval.validation", "eval.test", "student.metrics", "pruned.metrics")
            ]
            candidates += [k for k in self.keys if k.endswith(f".{m}")]
        candidates.append("eval_after.perplexity")
        return next((c for c in candidates if c in self.keys), self.keys[0])


def _cell(value):
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else json.dumps(value)


def collect(paths: list[str], keys: list[str] | None = None) -> Summary:
    runs = []
    for f in find_metrics(paths):
        raw = json.loads(f.read_text())
        run = Run(f.parent, raw, flatten(raw))
        task = sweep_task(f.parent)
        if task:
            run.sweep, manifest, i = task
            run.overrides = sweep_overrides(f.parent) or ""
            run.point = task_point(manifest, i)
        runs.append(run)
    if runs and not keys:  # the numbers every run has, in the first run's order
        keys = [k for k in runs[0].metrics if all(k in r.metrics for r in runs)]
    sweeps = {r.sweep for r in runs}
    sweep_dir = next(iter(sweeps)) if len(sweeps) == 1 else None
    manifests = [_manifest(d) for d in sweeps if d]
    seeded = bool(runs) and None not in sweeps and all(m.get("grid") and m.get("seed_key") for m in manifests)
    seed_key = manifests[0]["seed_key"] if seeded else None
    swept = []
    if sweep_dir:
        grid = _manifest(sweep_dir).get("grid")
        if isinstance(grid, dict):
            swept = [k for k in grid if k != seed_key]
        else:  # an --overrides-list sweep: the keys whose values differ between tasks
            points = [r.point for r in runs]
            named = dict.fromkeys(k for p in points for k in p)
            swept = [k for k in named if len({json.dumps(p.get(k), default=str) for p in points}) > 1]
    return Summary(runs, list(keys or []), swept, seed_key, sweep_dir)


def summary(paths: list[str], keys: list[str] | None = None) -> str:
    s = collect(paths, keys)
    return s.table() if s.runs else ""


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(s: Summary, metric: str, path: Path) -> Path:
    """One subplot per swept key: the metric's mean over seeds against the key's values, error bars the
    seeds' std, one line per combination of the other swept keys. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in s.groups() if g.stats(metric)]
    seeds = max((g.stats(metric)[2] for g in groups), default=1)
    fig, axes = plt.subplots(1, len(s.swept), figsize=(4.8 * len(s.swept), 4), squeeze=False)
    for ax, key in zip(axes[0], s.swept):
        values = list(dict.fromkeys(json.dumps(g.point.get(key), default=str) for g in groups))
        values = [json.loads(v) for v in values]
        numeric = _numeric(values)
        others = [k for k in s.swept if k != key]
        lines: dict[str, list] = {}
        for g in groups:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={g.point.get(k)}" for k in others)
            mean, std, _ = g.stats(metric)
            x = g.point.get(key) if numeric else values.index(g.point.get(key))
            lines.setdefault(label, []).append((x, mean, std))
        for label, pts in lines.items():
            pts.sort(key=lambda p: p[0])
            x, mean, std = zip(*pts)
            ax.errorbar(x, mean, yerr=std if seeds > 1 else None, marker="o", capsize=4, label=label or None)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if numeric:
            ax.set_xticks(sorted(values), [f"{v:g}" for v in sorted(values)])
        else:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if others and 1 < len(lines) <= 12:
            ax.legend(fontsize="small")
    how = f"mean ± std over {seeds} seeds" if seeds > 1 else "one run per point"
    fig.suptitle(f"{s.sweep_dir.name}: {metric} ({how})")
    return save_figure(fig, path)


def _hparam(value):
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)


def write_hparams(s: Summary, out: Path) -> Path:
    """Each run's grid point (seed included) and its metrics (the table's keys) as a TensorBoard HParams
    run, <out>/<run dir name>/; a run's earlier one replaced whole (written aside, then renamed)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    for r in s.runs:
        hparams = {k: _hparam(v) for k, v in (r.point or {"overrides": r.overrides}).items()}
        metrics = {k: float(r.metrics[k]) for k in s.keys if k in r.metrics}
        final, tag = out / r.path.name, uuid.uuid4().hex[:6]
        tmp, old = out / f".{r.path.name}.new-{tag}", out / f".{r.path.name}.old-{tag}"
        with SummaryWriter(log_dir=str(tmp)) as w:
            w.add_hparams(hparams, metrics, run_name=".")  # into tmp itself, not a timestamped subdir
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    return out
