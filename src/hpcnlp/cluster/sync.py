"""`hpcnlp sync`: on the login node, what brings the runs of offline compute nodes into view: the
`wandb sync` of each run's offline W&B dirs (printed, or run with --run), and the `mlflow ui` line of each
MLflow store the runs logged into (from run.json's tracking ids). docs/tracking.md."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from hpcnlp.cluster.plan import refused
from hpcnlp.cluster.status import resolve_runs
from hpcnlp.config import ConfigError
from hpcnlp.runtime import rundir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sync", help="print (or --run) the wandb sync and mlflow ui commands for a run's or a sweep's offline runs"
    )
    p.add_argument("target", help="a run's output_dir, a sweep's output_dir, a job config or a pipeline YAML")
    p.add_argument("--run", action="store_true", help="run the wandb sync commands (needs the internet and a login)")


def main(args: argparse.Namespace) -> int:
    try:
        runs = resolve_runs(args.target)
    except ConfigError as e:
        return refused(e, queueing=False)
    syncs, stores = [], []
    for run in runs:
        out = run.output_dir
        if out is None:
            continue
        offline = sorted(out.glob("wandb/offline-run-*"))  # one per start, in start order: wandb sync merges them
        if offline:
            syncs.append(["wandb", "sync", *map(str, offline)])
        uri = rundir.tracking_ids(out).get("mlflow_tracking_uri")
        if uri and uri not in stores:
            stores.append(uri)
    if not syncs and not stores:
        print(f"sync: no offline W&B runs and no MLflow store under {args.target}", file=sys.stderr)
        return 1
    failed = 0
    for cmd in syncs:
        print(shlex.join(cmd))
        if args.run:
            # This environment's wandb, not whichever is first on PATH.
            failed += subprocess.run([sys.executable, "-m", "wandb", *cmd[1:]]).returncode != 0
    for uri in stores:
        if uri.startswith("sqlite:"):
            print(shlex.join(["mlflow", "ui", "--backend-store-uri", uri]))
        else:
            print(f"# MLflow runs are on the server {uri}")
    return 1 if failed else 0
