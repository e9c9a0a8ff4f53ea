"""Queue jobs on Slurm, validated first: submit, pipeline (chained stages), sweep (job arrays), summary.

Every command checks configs with the same code as `hpcnlp check` (config.load_config) before it
calls sbatch: a bad config is refused and nothing waits in the queue. The batch scripts are the
templates in slurm/ (`slurm/<job>.sbatch <config> key=value ...`), which check again at start.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.config import ConfigError, JobConfig, Problem, dump_config, read_yaml
from hpcnlp.jobs import JOBS, load_config, run_job
from hpcnlp.report import markdown_table
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text
from hpcnlp.spec import JobSpec

COMMANDS = ("submit", "pipeline", "sweep", "summary")


def home() -> Path:
    """Where slurm/ lives: $HPCNLP_HOME, else the working dir when it has slurm/, else this checkout."""
    if os.environ.get("HPCNLP_HOME"):
        return Path(os.environ["HPCNLP_HOME"])
    if (Path.cwd() / "slurm" / "launch.sh").is_file():
        return Path.cwd()
    return Path(__file__).resolve().parents[2]


def template(job: str) -> Path:
    path = home() / "slurm" / f"{job}.sbatch"
    if not path.is_file():
        raise ConfigError(str(path), [Problem(key="job", message=f"no batch template for job '{job}'",
                                              fix="write it with `make templates`")])
    return path


def render_template(spec: JobSpec) -> str:
    """slurm/<job>.sbatch: the job's #SBATCH header (from its spec), then the one shared launcher."""
    s = spec.slurm
    procs = ("one process, whatever GPUs the node has" if spec.single_process
             else "one launcher per node; it starts one process per GPU")
    return "\n".join([
        "#!/bin/bash",
        f"# hpcnlp {spec.name}: {spec.help}.",
        f"#   sbatch slurm/{spec.name}.sbatch {spec.example} [key=value ...]    (from the repo root; or: hpcnlp submit)",
        "# Edit the #SBATCH lines for your cluster. Launcher, container image and processes per node are set",
        "# by HPCNLP_* variables (README, \"Running on Slurm\"), e.g. sbatch --export=ALL,HPCNLP_IMAGE=hpcnlp.sif ...",
        f"# Written by `make templates` from the job's spec (src/hpcnlp/jobs/{spec.name}.py).",
        f"#SBATCH --job-name=hpcnlp-{spec.name}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node=1            # {procs}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}" + (f"             # {s.note}" if s.note else ""),
        "##SBATCH --gpus-per-node=4             # uncomment on GPU nodes",
        "##SBATCH --partition=gpu",
        f"#SBATCH --time={s.time}",
        "#SBATCH --output=%x-%j.out",
        *(["#SBATCH --open-mode=append             # a requeued run appends to the same log",
           "#SBATCH --requeue",
           f"#SBATCH --signal=B:USR1@{s.signal_seconds}            # before the time limit: checkpoint, then requeue"]
          if spec.resumable else
          ["#SBATCH --no-requeue                  # nothing to resume: a failed run is rerun by hand"]),
        f'exec "${{HPCNLP_HOME:-$SLURM_SUBMIT_DIR}}/slurm/launch.sh" {spec.name} "$@"',
        ""])


def write_templates(root: Path | None = None) -> list[Path]:
    """`make templates`: slurm/<job>.sbatch for every job in the registry."""
    out = []
    for spec in JOBS.values():
        path = (root or home()) / "slurm" / f"{spec.name}.sbatch"
        path.write_text(render_template(spec))
        path.chmod(0o755)
        out.append(path)
    return out


def sbatch(script: Path, args: list[str], sbatch_args: list[str] = (), env: dict | None = None) -> str:
    """sbatch --parsable ... -> job id; sbatch's own refusal becomes a SystemExit with its message."""
    cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
    env = {**(env or os.environ), "HPCNLP_HOME": str(home())}  # the batch script finds slurm/launch.sh by it
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"error: sbatch refused the job: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ------------------------------------------------------------------------------------------
# submit
# ------------------------------------------------------------------------------------------
def snapshot(cfg: JobConfig, source: str, overrides: list[str]) -> Path:
    """The resolved config, frozen where the job reads it at every start and requeue: editing the YAML
    after submitting changes nothing in a queued or running job. Named by its content."""
    from importlib import metadata

    from hpcnlp.bundle import git_commit

    body = dump_config(cfg)
    root = Path(os.environ.get("HPCNLP_STATE_DIR") or Path.cwd() / "outputs" / ".slurm") / "configs"
    path = root / f"{cfg.job}-{hashlib.sha256(body.encode()).hexdigest()[:12]}.yaml"
    header = (f"# Frozen by hpcnlp {metadata.version('hpcnlp')} (code {git_commit() or 'not in git'}) on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# from {source} {' '.join(overrides)}\n")
    if not path.is_file():
        atomic_write_text(path, header + body)
    return path.absolute()


def queue(cfg: JobConfig, source: str, overrides: list[str], sbatch_args: list[str], env: dict | None = None) -> str:
    """sbatch the job's template with its frozen config; its status says queued."""
    job_id = sbatch(template(cfg.job), [str(snapshot(cfg, source, overrides))], sbatch_args, env)
    status.update(JOBS[cfg.job].status_file(cfg), create=True, state="queued", job=cfg.job, queued_job_id=job_id,
                  reason=None)
    return job_id


def submit(config: str, overrides: list[str], sbatch_args: list[str] = ()) -> str:
    return queue(load_config(config, overrides), config, overrides, sbatch_args)


# ------------------------------------------------------------------------------------------
# pipeline
# ------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)  # after ${stage.key} substitution
    sbatch: list[str] = field(default_factory=list)
    cfg: JobConfig | None = None
    skip: bool = False


def _resolve(path: str, where: str, overrides: dict, done: dict[str, JobConfig]) -> list[str]:
    """A stage's overrides as key=value, with ${stage.key} taken from earlier stages' resolved configs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

    tree = OmegaConf.create({**{name: cfg.model_dump(mode="json") for name, cfg in done.items()},
                             "_overrides": overrides})
    try:
        resolved = OmegaConf.to_container(tree, resolve=True)["_overrides"]
    except InterpolationKeyError as e:
        ref = str(e).split("'")[1]  # "Interpolation key 'stage.dotted.key' not found"
        stage, _, key = ref.partition(".")
        message, fix = ((f"stage '{stage}' has no key '{key}'", "name a key of that stage's config, e.g. output_dir")
                        if stage in done else (f"'${{{ref}}}' names no earlier stage", f"use one of {sorted(done)}"))
        raise ConfigError(path, [Problem(key=f"{where}.overrides.{e.full_key.removeprefix('_overrides.')}",
                                         message=message, fix=fix)]) from None
    except OmegaConfBaseException as e:
        raise ConfigError(path, [Problem(key=f"{where}.overrides", message=str(e).splitlines()[0],
                                         fix="write references as ${stage.key}")]) from None
    return [as_override(k, v) for k, v in resolved.items()]


def load_pipeline(path: str) -> list[Stage]:
    """Read and validate every stage up front; later stages may name earlier stages' outputs.

    Stages already complete (their job's is_complete) are marked `skip` as long as every stage before
    them is complete too: once one stage runs again, everything after it runs again.
    """
    raw = read_yaml(path)
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(path, [Problem(key="stages", message="missing or empty",
                                         fix="list the stages: - {name, config, overrides}")])
    common_sbatch = list(raw.get("sbatch", []))
    stages: list[Stage] = []
    done: dict[str, JobConfig] = {}
    pending: list[str] = []  # output dirs earlier stages will create
    all_done = True
    for i, item in enumerate(raw["stages"]):
        where = f"stages[{i}]"
        unknown = set(item) - {"name", "config", "overrides", "sbatch"}
        if unknown or "config" not in item:
            raise ConfigError(path, [Problem(key=where, message=f"unknown keys {sorted(unknown)}" if unknown
                                             else "no config", fix="a stage has name, config, overrides, sbatch")])
        name = str(item.get("name") or Path(item["config"]).stem)
        if name in done:
            raise ConfigError(path, [Problem(key=f"{where}.name", message=f"'{name}' is used twice",
                                             fix="give each stage its own name")])
        overrides = _resolve(path, where, item.get("overrides") or {}, done)
        cfg = load_config(item["config"], overrides, check=False)
        skip = all_done and JOBS[cfg.job].is_complete(cfg)
        all_done = skip
        if not skip:  # meaning checks, with the outputs of earlier stages counted as present
            try:
                load_config(item["config"], overrides, pending=pending)
            except ConfigError as e:
                raise ConfigError(f"{path} ({where} '{name}': {e.source})", e.problems) from None
            if cfg.output_dir:
                pending.append(cfg.output_dir)
        done[name] = cfg
        stages.append(Stage(name, item["config"], overrides, common_sbatch + list(item.get("sbatch", [])),
                            cfg, skip))
    return stages


def run_pipeline(path: str, local: bool = False, dry_run: bool = False) -> int:
    stages = load_pipeline(path)
    previous = None  # job id of the last submitted stage
    for st in stages:
        if st.skip:
            print(f"{st.name}: complete, skipped")
            continue
        if dry_run:
            print(f"{st.name}: would run {st.cfg.job} --config {st.config} {' '.join(st.overrides)}")
            continue
        if local:
            print(f"{st.name}: running {st.cfg.job} --config {st.config} {' '.join(st.overrides)}", flush=True)
            rc = run_job(load_config(st.config, st.overrides))  # checked again now that earlier outputs exist
            if rc != 0:
                print(f"{st.name}: failed (exit {rc}); later stages not run", file=sys.stderr)
                return rc
            continue
        dep = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        previous = queue(st.cfg, st.config, st.overrides, [f"--job-name=hpcnlp-{st.name}", *dep, *st.sbatch])
        print(f"{st.name}: submitted job {previous}" + (f" (after {dep[0].split(':')[1]})" if dep else ""))
    if local and not dry_run:
        print("\n" + markdown_table([stage_row(st.name, st.cfg) for st in stages]))
    return 0


def stage_row(name: str, cfg: JobConfig) -> dict:
    """One line of a stage's results: its headline metric, model size, latency (batch 1, p50)."""
    row = {"stage": name, "job": cfg.job, "metric": "", "size": "", "latency b1 p50": "", "output": cfg.output_dir}
    try:
        row.update(JOBS[cfg.job].summary_row(cfg))
    except FileNotFoundError:
        pass  # the stage wrote no results (yet)
    return row


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------
def sweep(config: str, overrides: list[str], tasks: list[list[str]], max_parallel: int | None,
          sbatch_args: list[str] = ()) -> str:
    """One array task per override set, each in <output_dir>/task-<i>; a manifest says which is which."""
    base = load_config(config, overrides, check=False).output_dir
    task_args = [[*t, f"output_dir={base}/task-{i}"] for i, t in enumerate(tasks)]
    for i, t in enumerate(task_args):
        try:
            load_config(config, [*overrides, *t])
        except ConfigError as e:
            raise ConfigError(f"{config} (sweep task {i}: {' '.join(tasks[i])})", e.problems) from None
    cfg = load_config(config, overrides, check=False)
    manifest = Path(base) / "sweep.json"
    atomic_write_json(manifest, {"config": config, "overrides": overrides, "tasks": task_args})
    array = f"--array=0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    env = {**os.environ, "HPCNLP_SWEEP": str(manifest.resolve())}  # launch.py appends task i's overrides
    return sbatch(template(cfg.job), [str(snapshot(cfg, config, overrides))], [array, *sbatch_args], env=env)


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def find_metrics(paths: list[str]) -> list[Path]:
    found = []
    for pattern in paths:
        for p in sorted(glob.glob(pattern)) or [pattern]:
            p = Path(p)
            if p.name == "metrics.json" and p.is_file():
                found.append(p)
            elif (p / "metrics.json").is_file():
                found.append(p / "metrics.json")
            elif p.is_dir():
                found += sorted(p.glob("*/metrics.json"))
    return list(dict.fromkeys(found))


def summary(paths: list[str], keys: list[str] | None = None) -> str:
    rows = []
    for f in find_metrics(paths):
        rows.append({"run": str(f.parent), **_flatten(json.loads(f.read_text()))})
    if not rows:
        return ""
    if not keys:  # the numbers every run has, in the first run's order
        keys = [k for k in rows[0] if k != "run" and all(k in r for r in rows)]
    return markdown_table(rows, ["run", *keys])


# ------------------------------------------------------------------------------------------
# command line (wired into `hpcnlp` by cli.py)
# ------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("submit", help="check a job config, then sbatch slurm/<job>.sbatch with it")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--nodes=4 (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("pipeline", help="check all stages of a pipeline YAML, then queue them as a chain")
    p.add_argument("--config", "-c", required=True, help="pipeline YAML, e.g. jobs/pipeline.yaml")
    p.add_argument("--local", action="store_true", help="run the stages here, one after another, no Slurm")
    p.add_argument("--dry-run", action="store_true", help="check and print the stages; queue nothing")
    p = sub.add_parser("sweep", help="check a job config for each override set, then queue a job array")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--overrides-list", nargs="+", required=True, metavar="'k=v k=v'",
                   help="one quoted, space-separated override set per array task (put this option last)")
    p.add_argument("--max-parallel", type=int, default=None, help="run at most K tasks at once (--array=..%%K)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides common to all tasks")
    p = sub.add_parser("summary", help="one table of the metrics.json of several runs (e.g. a sweep)")
    p.add_argument("paths", nargs="+", help="run dirs, their parent (a sweep's output_dir) or globs")
    p.add_argument("--keys", help="comma-separated metric keys (dotted for nested), default: all shared")


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "submit":
            print(f"submitted job {submit(args.config, args.overrides, args.sbatch)}")
        elif args.command == "pipeline":
            return run_pipeline(args.config, local=args.local, dry_run=args.dry_run)
        elif args.command == "sweep":
            tasks = [t.split() for t in args.overrides_list]
            job_id = sweep(args.config, args.overrides, tasks, args.max_parallel, args.sbatch)
            print(f"submitted array job {job_id} ({len(tasks)} tasks)")
        elif args.command == "summary":
            table = summary(args.paths, args.keys.split(",") if args.keys else None)
            if not table:
                print(f"error: no metrics.json under {' '.join(args.paths)}", file=sys.stderr)
                return 1
            print(table)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        print("error: nothing was queued", file=sys.stderr)
        return 2
    return 0
