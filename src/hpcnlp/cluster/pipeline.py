"""`hpcnlp pipeline`: check every stage of a pipeline YAML, then queue them as a chain of Slurm jobs
(each after the one before it, afterok), or run them here one after another (--local).

Later stages may name earlier stages' resolved keys (`${pretrain.output_dir}`); stages already
complete are skipped as long as every stage before them is complete too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.cluster.jobs_alive import run_busy
from hpcnlp.cluster.plan import refused
from hpcnlp.cluster.profile import load_profile
from hpcnlp.cluster.submit import queue
from hpcnlp.config import ConfigError, JobConfig, Problem, read_yaml
from hpcnlp.jobs import check_config, load_config, registry, run_job
from hpcnlp.report import markdown_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="check all stages of a pipeline YAML, then queue them as a chain")
    p.add_argument("--config", "-c", required=True, help="pipeline YAML, e.g. jobs/pipeline.yaml")
    p.add_argument("--local", action="store_true", help="run the stages here, one after another, no Slurm")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every stage and print its sbatch, launch and log lines; queue nothing",
    )
    p.add_argument(
        "--force", action="store_true", help="queue even when stages of the chain still have jobs queued or running"
    )


def main(args: argparse.Namespace) -> int:
    try:
        return run_pipeline(args.config, local=args.local, dry_run=args.dry_run, force=args.force)
    except ConfigError as e:
        return refused(e)


@dataclass
class Stage:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)  # after ${stage.key} substitution
    sbatch: list[str] = field(default_factory=list)
    cfg: JobConfig | None = None
    skip: bool = False


def as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def resolve(path: str, where: str, overrides: dict, done: dict[str, JobConfig]) -> list[str]:
    """A stage's overrides as key=value, with ${stage.key} taken from earlier stages' resolved configs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

    tree = OmegaConf.create(
        {**{name: cfg.model_dump(mode="json") for name, cfg in done.items()}, "_overrides": overrides}
    )
    try:
        resolved = OmegaConf.to_container(tree, resolve=True)["_overrides"]
    except InterpolationKeyError as e:
        ref = str(e).split("'")[1]  # "Interpolation key 'stage.dotted.key' not found"
        stage, _, key = ref.partition(".")
        message, fix = (
            (f"stage '{stage}' has no key '{key}'", "name a key of that stage's config, e.g. output_dir")
            if stage in done
            else (f"'${{{ref}}}' names no earlier stage", f"use one of {sorted(done)}")
        )
        raise ConfigError(
            path, [Problem(key=f"{where}.overrides.{e.full_key.removeprefix('_overrides.')}", message=message, fix=fix)]
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            path,
            [Problem(key=f"{where}.overrides", message=str(e).splitlines()[0], fix="write references as ${stage.key}")],
        ) from None
    return [as_override(k, v) for k, v in resolved.items()]


def load_pipeline(path: str, check: bool = True) -> list[Stage]:
    """Read and validate every stage up front (each stage's config loaded once); later stages may name
    earlier stages' outputs.

    Stages already complete (their job's is_complete) are marked `skip` as long as every stage before
    them is complete too: once one stage runs again, everything after it runs again.
    """
    raw = read_yaml(path)
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(
            path,
            [Problem(key="stages", message="missing or empty", fix="list the stages: - {name, config, overrides}")],
        )
    common_sbatch = list(raw.get("sbatch", []))
    stages: list[Stage] = []
    done: dict[str, JobConfig] = {}
    pending: list[str] = []  # output dirs earlier stages will create
    all_done = True
    jobs = registry()
    for i, item in enumerate(raw["stages"]):
        where = f"stages[{i}]"
        unknown = set(item) - {"name", "config", "overrides", "sbatch"}
        if unknown or "config" not in item:
            raise ConfigError(
                path,
                [
                    Problem(
                        key=where,
                        message=f"unknown keys {sorted(unknown)}" if unknown else "no config",
                        fix="a stage has name, config, overrides, sbatch",
                    )
                ],
            )
        name = str(item.get("name") or Path(item["config"]).stem)
        if name in done:
            raise ConfigError(
                path,
                [Problem(key=f"{where}.name", message=f"'{name}' is used twice", fix="give each stage its own name")],
            )
        overrides = resolve(path, where, item.get("overrides") or {}, done)
        cfg = load_config(item["config"], overrides, check=False)
        skip = all_done and jobs[cfg.job].is_complete(cfg)
        all_done = skip
        if check and not skip:  # meaning checks, with the outputs of earlier stages counted as present
            problems = check_config(cfg, pending)
            if problems:
                raise ConfigError(f"{path} ({where} '{name}': {item['config']})", problems)
            if cfg.output_dir:
                pending.append(cfg.output_dir)
        done[name] = cfg
        stages.append(Stage(name, item["config"], overrides, common_sbatch + list(item.get("sbatch", [])), cfg, skip))
    return stages


def busy_stages(path: str, stages: list[Stage]) -> None:
    """ConfigError when a stage to be queued still has a job queued or running (the chain queued
    before): nothing of the new chain is queued then."""
    jobs = registry()
    problems = [
        p.model_copy(update={"key": f"{st.name}"})
        for st in stages
        if not st.skip
        for p in run_busy(f"stage '{st.name}' ({st.cfg.output_dir})", jobs[st.cfg.job].status_file(st.cfg))
    ]
    if problems:
        raise ConfigError(path, problems)


def run_pipeline(path: str, local: bool = False, dry_run: bool = False, force: bool = False) -> int:
    stages = load_pipeline(path)
    profile = None if local else load_profile()
    if not local and not dry_run and not force:
        busy_stages(path, stages)
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
            problems = check_config(st.cfg)  # checked again now that earlier outputs exist
            if problems:
                raise ConfigError(str(st.config), problems)
            rc = run_job(st.cfg)
            if rc != 0:
                print(f"{st.name}: failed (exit {rc}); later stages not run", file=sys.stderr)
                return rc
            continue
        dep = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        job_id = queue(
            st.cfg,
            st.config,
            st.overrides,
            [*dep, *st.sbatch],
            profile,
            dry_run=dry_run,
            title=st.name,
            data_pending=preparing,
            force=True,
        )  # busy stages were refused above, all at once
        previous = job_id or f"<{st.name}>"
        preparing = preparing or st.cfg.job == "prepare"  # queued before the stages after it
    if local and not dry_run:
        print("\n" + markdown_table([stage_row(st.name, st.cfg) for st in stages]))
    return 0


def stage_row(name: str, cfg: JobConfig) -> dict:
    """One line of a stage's results: its headline metric, model size, latency (batch 1, p50)."""
    row = {"stage": name, "job": cfg.job, "metric": "", "size": "", "latency b1 p50": "", "output": cfg.output_dir}
    try:
        row.update(registry()[cfg.job].summary_row(cfg))
    except FileNotFoundError:
        pass  # the stage wrote no results (yet)
    return row
