"""`hpcnlp submit`: check a job config, freeze it, then sbatch its batch script with it.

The config is checked with the same code as `hpcnlp check` (hpcnlp.jobs.load_config, then
hpcnlp.cluster.plan against the cluster profile) before sbatch is called: a bad config is refused and
nothing waits in the queue. The batch script (slurm/<job>.sbatch) checks again at start.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import yaml

from hpcnlp.cluster.jobs_alive import run_busy
from hpcnlp.cluster.options import job_name, option_value
from hpcnlp.cluster.plan import plan, refused
from hpcnlp.cluster.profile import ClusterProfile, load_profile
from hpcnlp.cluster.templates import state_dir
from hpcnlp.config import ConfigError, JobConfig, read_yaml
from hpcnlp.jobs import load_config, registry
from hpcnlp.runtime import status
from hpcnlp.runtime.env import code_version
from hpcnlp.runtime.io import atomic_write_text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("submit", help="check a job config, then sbatch slurm/<job>.sbatch with it")
    p.add_argument("--config", "-c", required=True)
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra sbatch option, e.g. --sbatch=--nodes=4 (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check and print the sbatch, launch and log lines; queue nothing"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="submit even when the run already has a job queued or running (or squeue cannot say)",
    )
    p.add_argument(
        "--allow-code-change",
        action="store_true",
        help="let the job start from other code than this (a checkout or image updated while it waits)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")


def main(args: argparse.Namespace) -> int:
    try:
        submit(
            args.config,
            args.overrides,
            args.sbatch,
            dry_run=args.dry_run,
            force=args.force,
            allow_code_change=args.allow_code_change,
        )
    except ConfigError as e:
        return refused(e)
    return 0


def submit(
    config: str,
    overrides: list[str],
    sbatch_args: list[str] = (),
    dry_run: bool = False,
    force: bool = False,
    allow_code_change: bool = False,
) -> str | None:
    return queue(
        load_config(config, overrides),
        config,
        overrides,
        list(sbatch_args),
        dry_run=dry_run,
        title="submit",
        force=force,
        env={"HPCNLP_ALLOW_CODE_CHANGE": "1"} if allow_code_change else None,
    )


def snapshot(cfg: JobConfig, source: str, overrides: list[str], write: bool = True) -> Path:
    """The resolved config, frozen where the job reads it at every start and requeue, with a frozen copy
    of every settings file it names (freeze_files): editing the YAML, the DeepSpeed JSON or a downstream
    config after submitting changes nothing in a queued or running job. Named by its content."""
    from importlib import metadata

    body = yaml.safe_dump(freeze_files(cfg.model_dump(mode="json"), write), sort_keys=False)
    path = state_dir() / "configs" / f"{cfg.job}-{hashlib.sha256(body.encode()).hexdigest()[:12]}.yaml"
    header = (
        f"# Frozen by hpcnlp {metadata.version('hpcnlp')} (code {code_version()}) on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# from {source} {' '.join(overrides)}\n"
    )
    if write and not path.is_file():
        atomic_write_text(path, header + body)
    return path.absolute()


def freeze_files(raw: dict, write: bool = True, seen: frozenset = frozenset()) -> dict:
    """`raw` (a job config as a mapping) with each settings file its job names (the config class's
    SETTING_FILES: a DeepSpeed JSON, a downstream or data_from job config) replaced by the path of a
    frozen copy, content-addressed under the state dir; a job config named so is frozen the same way."""
    spec = registry().get(raw.get("job")) if isinstance(raw.get("job"), str) else None
    for key in spec.config.SETTING_FILES if spec else ():
        *parents, last = key.split(".")
        holder = raw
        for name in parents:
            holder = holder.get(name) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(last), str) and Path(holder[last]).is_file():
            holder[last] = str(frozen_copy(Path(holder[last]), write, seen))
    return raw


def frozen_copy(path: Path, write: bool, seen: frozenset) -> Path:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml") and path.resolve() not in seen:  # a job config: its own files too
        text = yaml.safe_dump(freeze_files(read_yaml(path), write, seen | {path.resolve()}), sort_keys=False)
    copy = state_dir() / "configs" / "files" / hashlib.sha256(text.encode()).hexdigest()[:12] / path.name
    if write and not copy.is_file():
        atomic_write_text(copy, text)
    return copy.absolute()


def expand_log(pattern: str, job_id: str, name: str) -> str:
    """Slurm's %x (name), %j (id), %A (array id) in a log path; %a (the task) is said as <task>."""
    return pattern.replace("%x", name).replace("%j", job_id).replace("%A", job_id).replace("%a", "<task>")


def queue(
    cfg: JobConfig,
    source: str,
    overrides: list[str],
    sbatch_args: list[str],
    profile: ClusterProfile | None = None,
    dry_run: bool = False,
    title: str = "",
    data_pending: bool = False,
    force: bool = False,
    env: dict[str, str] | None = None,
) -> str | None:
    """sbatch the job's template with its frozen config; its status says queued, with the log path.
    Prints `<title>: submitted job <id>, log <path>` (dry run: the sbatch, srun, node and log lines).
    A dry run prints the whole plan even when the run would be refused for data a prepare run has yet
    to make (a warning names the prepare stage); a real submit refuses it, and refuses a run that already
    has a job queued or running (unless `force`)."""
    profile = profile or load_profile()
    title = title or job_name(cfg)
    spec = registry()[cfg.job]
    planned = plan(
        cfg,
        spec,
        profile,
        snapshot(cfg, source, overrides, write=not dry_run),
        source,
        sbatch_args,
        env=env,
        data_pending=data_pending or dry_run,
    )
    sub = planned.checked()
    if dry_run and not data_pending:
        for p in planned.deferred:
            print(f"warning: {source}: {p.key}: {p.message}. Fix: {p.fix}", file=sys.stderr)
        if planned.deferred:
            print(
                f"warning: {title}: submitting it now is refused until its data is prepared: run the prepare stage "
                f"first (hpcnlp submit --config jobs/prepare.yaml, or the whole chain: hpcnlp pipeline --config "
                f"jobs/pipeline.yaml)",
                file=sys.stderr,
            )
    if not dry_run and not force:
        busy = run_busy(f"run '{cfg.output_dir}'", spec.status_file(cfg))
        if busy:
            raise ConfigError(source, busy)
    if dry_run:
        print(f"{title}: would submit {cfg.job} ({' '.join([source, *overrides])})\n{sub.describe()}")
        return None
    job_id = sub.run()
    log = expand_log(sub.log, job_id, sub.name)
    status.update_outside(  # a job that took the run since the busy check keeps its own status
        spec.status_file(cfg), state="queued", job=cfg.job, queued_job_id=job_id, reason=None, log=log
    )
    after = option_value(sbatch_args, "--dependency")
    print(
        f"{title}: submitted job {job_id}" + (f" (after {after.split(':', 1)[1]})" if after else "") + f", log {log}",
        flush=True,
    )
    return job_id
