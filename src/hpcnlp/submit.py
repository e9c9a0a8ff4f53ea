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
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp import cluster
from hpcnlp.config import ClusterProfile, ConfigError, JobConfig, Problem, dump_config, read_yaml
from hpcnlp.jobs import JOBS, load_config, run_job
from hpcnlp.report import markdown_table
from hpcnlp.runtime import status
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text
from hpcnlp.spec import JobSpec

COMMANDS = ("submit", "pipeline", "sweep", "summary", "status")


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
        "# `hpcnlp submit` renders the cluster profile (jobs/cluster.yaml: account, partition, GPUs, container...)",
        "# into sbatch options that win over these lines. Plain sbatch: edit the lines below; launcher and image",
        "# are HPCNLP_* variables (README, \"Running on Slurm\"), e.g. sbatch --export=ALL,HPCNLP_IMAGE=hpcnlp.sif ...",
        f"# Written by `make templates` from the job's spec (src/hpcnlp/jobs/{spec.name}.py).",
        f"#SBATCH --job-name=hpcnlp-{spec.name}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node=1            # {procs}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}" + (f"             # {s.note}" if s.note else ""),
        "##SBATCH --gpus-per-node=4             # plain sbatch on GPU nodes: uncomment (submit: gpus_per_node)",
        "##SBATCH --partition=gpu               # (submit: partition)",
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


@dataclass
class Submission:
    """One sbatch call, complete: what a dry run prints is what is run."""

    name: str
    env: dict[str, str]  # set for sbatch (and so for the job) on top of the submitting environment
    argv: list[str]  # sbatch --parsable <options> <script> <args>
    launch: list[str]  # the srun line and the per-node launcher line (dry-run display)

    @property
    def log(self) -> str:
        return cluster.option_value(self.argv, "--output") or "slurm-%j.out"

    def command_line(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])

    def describe(self) -> str:
        return "\n".join([f"  sbatch: {self.command_line()}", f"  srun:   {self.launch[0]}",
                          f"  node:   {self.launch[1]}", f"  log:    {self.log.replace('%x', self.name)}"])

    def run(self) -> str:
        """sbatch -> job id; sbatch's own refusal becomes a SystemExit with its message."""
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)  # sbatch does not make it
        res = subprocess.run(self.argv, capture_output=True, text=True, env={**os.environ, **self.env})
        if res.returncode != 0:
            raise SystemExit(f"error: sbatch refused the job: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]


def expand_log(pattern: str, job_id: str, name: str) -> str:
    """Slurm's %x (name), %j (id), %A (array id) in a log path; %a (the task) is said as <task>."""
    return pattern.replace("%x", name).replace("%j", job_id).replace("%A", job_id).replace("%a", "<task>")


def submission(cfg: JobConfig, config: Path, sbatch_args: list[str], profile: ClusterProfile,
               array: str | None = None, env: dict | None = None, data_pending: bool = False) -> Submission:
    """The sbatch call for a checked config: the profile's options, then the job's own (which win).
    `data_pending`: an earlier pipeline stage prepares the corpus (see cluster.profile_problems)."""
    spec = JOBS[cfg.job]
    name = cluster.job_name(cfg)
    options = cluster.sbatch_options(profile, spec, name, array=bool(array),
                                     extra=[*([array] if array else []), *sbatch_args])
    problems = cluster.profile_problems(cfg, options, profile, data_pending)
    if problems:
        raise ConfigError(f"{cfg._source} (sent with {' '.join(options)})", problems)
    # The batch script finds slurm/launch.sh by HPCNLP_HOME.
    env = {"HPCNLP_HOME": str(home()), **cluster.launch_env(profile), **(env or {})}
    return Submission(name, env, ["sbatch", "--parsable", *options, str(template(cfg.job)), str(config)],
                      cluster.launch_lines(profile, spec, [str(config)], options, home()))


def as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ------------------------------------------------------------------------------------------
# submit
# ------------------------------------------------------------------------------------------
def snapshot(cfg: JobConfig, source: str, overrides: list[str], write: bool = True) -> Path:
    """The resolved config, frozen where the job reads it at every start and requeue: editing the YAML
    after submitting changes nothing in a queued or running job. Named by its content."""
    from importlib import metadata

    from hpcnlp.ship.bundle import git_commit

    body = dump_config(cfg)
    root = Path(os.environ.get("HPCNLP_STATE_DIR") or Path.cwd() / "outputs" / ".slurm") / "configs"
    path = root / f"{cfg.job}-{hashlib.sha256(body.encode()).hexdigest()[:12]}.yaml"
    header = (f"# Frozen by hpcnlp {metadata.version('hpcnlp')} (code {git_commit() or 'not in git'}) on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# from {source} {' '.join(overrides)}\n")
    if write and not path.is_file():
        atomic_write_text(path, header + body)
    return path.absolute()


def queue(cfg: JobConfig, source: str, overrides: list[str], sbatch_args: list[str],
          profile: ClusterProfile | None = None, dry_run: bool = False, title: str = "",
          data_pending: bool = False) -> str | None:
    """sbatch the job's template with its frozen config; its status says queued, with the log path.
    Prints `<title>: submitted job <id>, log <path>` (dry run: the sbatch, srun, node and log lines)."""
    profile = profile or cluster.load_profile()
    title = title or cluster.job_name(cfg)
    sub = submission(cfg, snapshot(cfg, source, overrides, write=not dry_run), sbatch_args, profile,
                     data_pending=data_pending)
    if dry_run:
        print(f"{title}: would submit {cfg.job} ({' '.join([source, *overrides])})\n{sub.describe()}")
        return None
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    status.update(JOBS[cfg.job].status_file(cfg), create=True, state="queued", job=cfg.job, queued_job_id=job_id,
                  reason=None, log=log)
    after = cluster.option_value(sbatch_args, "--dependency")
    print(f"{title}: submitted job {job_id}" + (f" (after {after.split(':', 1)[1]})" if after else "")
          + f", log {log}", flush=True)
    return job_id


def submit(config: str, overrides: list[str], sbatch_args: list[str] = (), dry_run: bool = False) -> str | None:
    return queue(load_config(config, overrides), config, overrides, list(sbatch_args), dry_run=dry_run,
                 title="submit")


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


def load_pipeline(path: str, check: bool = True) -> list[Stage]:
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
        if check and not skip:  # meaning checks, with the outputs of earlier stages counted as present
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
    profile = None if local else cluster.load_profile()
    previous = None  # job id of the last submitted stage (dry run: its name)
    preparing = False  # a prepare stage is queued ahead: later pretrain stages find its data when they start
    for st in stages:
        if st.skip:
            print(f"{st.name}: complete, skipped")
            continue
        if local:
            if dry_run:
                print(f"{st.name}: would run {st.cfg.job} --config {st.config} {' '.join(st.overrides)}")
                continue
            print(f"{st.name}: running {st.cfg.job} --config {st.config} {' '.join(st.overrides)}", flush=True)
            rc = run_job(load_config(st.config, st.overrides))  # checked again now that earlier outputs exist
            if rc != 0:
                print(f"{st.name}: failed (exit {rc}); later stages not run", file=sys.stderr)
                return rc
            continue
        dep = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        job_id = queue(st.cfg, st.config, st.overrides, [*dep, *st.sbatch], profile, dry_run=dry_run, title=st.name,
                       data_pending=preparing)
        previous = job_id or f"<{st.name}>"
        preparing = preparing or st.cfg.job == "prepare"  # queued before the stages after it
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
          sbatch_args: list[str] = (), dry_run: bool = False) -> str | None:
    """One array task per override set, each in <output_dir>/task-<i>; a manifest says which is which.
    One log per task: <log_dir>/<name>-<array id>_<task>.out."""
    base = load_config(config, overrides, check=False).output_dir
    task_args = [[*t, f"output_dir={base}/task-{i}"] for i, t in enumerate(tasks)]
    for i, t in enumerate(task_args):
        try:
            load_config(config, [*overrides, *t])
        except ConfigError as e:
            raise ConfigError(f"{config} (sweep task {i}: {' '.join(tasks[i])})", e.problems) from None
    cfg = load_config(config, overrides, check=False)
    manifest = Path(base) / "sweep.json"
    array = f"--array=0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    env = {"HPCNLP_SWEEP": str(manifest.absolute())}  # launch.py appends task i's overrides
    sub = submission(cfg, snapshot(cfg, config, overrides, write=not dry_run), list(sbatch_args),
                     cluster.load_profile(), array=array, env=env)
    if dry_run:
        print(f"sweep: would submit an array of {len(tasks)} {cfg.job} tasks\n" + sub.describe())
        return None
    atomic_write_json(manifest, {"config": config, "overrides": overrides, "tasks": task_args})
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    print(f"submitted array job {job_id} ({len(tasks)} tasks), logs {log}")
    return job_id


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
        rows.append({"run": str(f.parent), "overrides": sweep_overrides(f.parent) or "", **_flatten(json.loads(f.read_text()))})
    if not rows:
        return ""
    if not keys:  # the numbers every run has, in the first run's order
        keys = [k for k in rows[0] if k not in ("run", "overrides") and all(k in r for r in rows)]
    sweep = ["overrides"] if any(r["overrides"] for r in rows) else []  # which grid point each task is
    return markdown_table(rows, ["run", *sweep, *keys])


# ------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------
FINAL = {"finished", "failed", "rejected"}


def slurm_state(job_id: str | None) -> str:
    """The job's state as Slurm knows it: squeue (pending, running, recently ended), else sacct; '' when
    there is no Slurm here or it has forgotten the job."""
    if not job_id or not shutil.which("squeue"):
        return ""
    for cmd in (["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()[0]
    return ""


def current_job(st: dict) -> str | None:
    """The job id working on the run now: the one submitted last, unless a later one already ran."""
    ran = st.get("slurm_job_ids") or []
    queued = st.get("queued_job_id")
    return queued if queued and queued not in ran else (ran[-1] if ran else queued)


def _eta(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def status_row(name: str, path: Path | None) -> dict:
    try:
        st = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        st = {}
    job = current_job(st)
    step = f"{st['step']}/{st.get('max_steps', '?')}" if "step" in st else ""
    loss = st.get("loss")
    return {"stage": name, "state": st.get("state", "not started"), "slurm": slurm_state(job), "job id": job or "",
            "step": step, "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
            "ETA": _eta(st.get("eta_seconds")) if st.get("state") == "running" else "",
            "restarts": st.get("restarts", ""), "log": st.get("log", ""), "reason": st.get("reason") or ""}


def status_rows(target: str) -> list[dict]:
    """Rows of `hpcnlp status`: a pipeline YAML (one per stage), a job config, a sweep's output_dir (one
    per task), or a run's output_dir."""
    p = Path(target)
    if p.is_file():
        raw = read_yaml(p)
        if "stages" in raw:
            stages = load_pipeline(target, check=False)
            return [status_row(st.name, JOBS[st.cfg.job].status_file(st.cfg)) for st in stages]
        cfg = load_config(target, check=False)
        return [status_row(cfg.job, JOBS[cfg.job].status_file(cfg))]
    if (p / "sweep.json").is_file():
        tasks = json.loads((p / "sweep.json").read_text())["tasks"]
        return [status_row(f"task-{i}", p / f"task-{i}" / "status.json") for i in range(len(tasks))]
    if not (p / "status.json").is_file():
        raise ConfigError(target, [Problem(key="<target>", message="no status.json there, and not a config",
                                           fix="give a run's or a sweep's output_dir, a job config or a pipeline YAML")])
    return [status_row(p.name, p / "status.json")]


def show_status(target: str, watch: float | None = None) -> int:
    while True:
        rows = status_rows(target)
        keys = [k for k in ("stage", "state", "slurm", "job id", "step", "loss", "ETA", "restarts", "log", "reason")
                if k in ("stage", "state") or any(r[k] not in ("", None) for r in rows)]
        table = markdown_table(rows, keys)
        if watch is None:
            print(table)
            return 0
        head = f"{time.strftime('%H:%M:%S')} hpcnlp status {target} (every {watch:g} s; Ctrl-C stops)"
        print(f"\033[H\033[2J{head}\n{table}", flush=True)  # clear the screen, then the table
        if all(r["state"] in FINAL and r["slurm"] in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for r in rows):
            return 0
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0


# ------------------------------------------------------------------------------------------
# command line (wired into `hpcnlp` by cli.py)
# ------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("submit", help="check a job config, then sbatch slurm/<job>.sbatch with it")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--nodes=4 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and print the sbatch, launch and log lines; queue nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("pipeline", help="check all stages of a pipeline YAML, then queue them as a chain")
    p.add_argument("--config", "-c", required=True, help="pipeline YAML, e.g. jobs/pipeline.yaml")
    p.add_argument("--local", action="store_true", help="run the stages here, one after another, no Slurm")
    p.add_argument("--dry-run", action="store_true",
                   help="check every stage and print its sbatch, launch and log lines; queue nothing")
    p = sub.add_parser("sweep", help="check a job config for each override set, then queue a job array")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--overrides-list", nargs="+", required=True, metavar="'k=v k=v'",
                   help="one quoted, space-separated override set per array task (put this option last)")
    p.add_argument("--max-parallel", type=int, default=None, help="run at most K tasks at once (--array=..%%K)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION")
    p.add_argument("--dry-run", action="store_true", help="check every task and print the sbatch line; queue nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides common to all tasks")
    p = sub.add_parser("status", help="state, step, loss, ETA, restarts and log of a run, sweep or pipeline")
    p.add_argument("target", help="a run's output_dir, a sweep's output_dir, a job config or a pipeline YAML")
    p.add_argument("--watch", action="store_true", help="refresh until every stage has ended (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="--watch refresh period")
    p = sub.add_parser("summary", help="one table of the metrics.json of several runs (e.g. a sweep)")
    p.add_argument("paths", nargs="+", help="run dirs, their parent (a sweep's output_dir) or globs")
    p.add_argument("--keys", help="comma-separated metric keys (dotted for nested), default: all shared")


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "submit":
            submit(args.config, args.overrides, args.sbatch, dry_run=args.dry_run)
        elif args.command == "pipeline":
            return run_pipeline(args.config, local=args.local, dry_run=args.dry_run)
        elif args.command == "sweep":
            sweep(args.config, args.overrides, [t.split() for t in args.overrides_list], args.max_parallel,
                  args.sbatch, dry_run=args.dry_run)
        elif args.command == "status":
            return show_status(args.target, args.interval if args.watch else None)
        elif args.command == "summary":
            table = summary(args.paths, args.keys.split(",") if args.keys else None)
            if not table:
                print(f"error: no metrics.json under {' '.join(args.paths)}", file=sys.stderr)
                return 1
            print(table)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        if args.command in ("submit", "pipeline", "sweep"):
            print("error: nothing was queued", file=sys.stderr)
        return 2
    return 0
