"""The job registry: every job is one module here with a `SPEC` (hpcnlp.spec.JobSpec).

Adding a job: a module with its config class (hpcnlp.config), check, run and SPEC, listed below, plus
its YAML in jobs/; `make templates` writes its slurm/<job>.sbatch. The CLI, the launcher,
submit/pipeline/sweep and `hpcnlp check` all read JOBS.
"""
from __future__ import annotations

import difflib
import sys
from typing import Iterable

from hpcnlp.config import ConfigError, JobConfig, Problem, read_yaml, with_overrides
from hpcnlp.config import validate as validate_shape
from hpcnlp.jobs import distill, export, finetune, prepare, pretrain, prune, validate
from hpcnlp.runtime import env, rundir, status
from hpcnlp.spec import JobSpec

JOBS: dict[str, JobSpec] = {m.SPEC.name: m.SPEC for m in (prepare, pretrain, finetune, distill, prune, export, validate)}
EXIT_CONFIG = status.EXIT_CONFIG  # the config (or its data) was refused; nothing ran, nothing was written


def load_config(path, overrides: Iterable[str] = (), expect_job: str | None = None, pending: Iterable[str] = (),
                check: bool = True) -> JobConfig:
    """Read, override, validate, and (with `check`) run the job's file checks. Raises ConfigError with
    every problem at once, before anything runs. `pending`: paths earlier pipeline stages will create."""
    source = str(path)
    raw = with_overrides(read_yaml(path), overrides)
    job = raw.get("job", expect_job)
    if job not in JOBS:
        close = difflib.get_close_matches(str(job), list(JOBS), n=1)
        raise ConfigError(source, [Problem(key="job", message=f"unknown job {job!r}",
                                           fix=f"did you mean '{close[0]}'?" if close
                                           else f"set job: to one of {sorted(JOBS)}")])
    if expect_job and job != expect_job:
        raise ConfigError(source, [Problem(key="job", message=f"this is a '{job}' config, not '{expect_job}'",
                                           fix=f"run `hpcnlp {job}` or pass a {expect_job} config")])
    spec = JOBS[job]
    if job == "prepare" and raw.get("data_from"):
        raw = prepare.with_data_from(raw, source)
    cfg = validate_shape(spec.config, {**raw, "job": job}, source)
    problems = cfg.problems()
    if check:
        problems += spec.check(cfg, list(pending)) + _placement_problems(spec)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _placement_problems(spec: JobSpec) -> list[Problem]:
    """Inside a Slurm allocation: a single-process job on several nodes would race on its output."""
    if spec.single_process and env.slurm_num_nodes() > 1:
        return [Problem(key="job", message=f"'{spec.name}' runs as one process on one node, this allocation "
                        f"has {env.slurm_num_nodes()} nodes", fix="submit it with --nodes=1")]
    return []


def report(e: ConfigError) -> int:
    for line in e.lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def run_job(cfg: JobConfig) -> int:
    """Run a checked config's job and say how it ended: status.json, the outcome line for the batch
    script, the exit code (hpcnlp.runtime.status). A ConfigError found only once the job reads its data
    (a column, a label, a file's format) is reported like a refused config: one line per problem, exit 2."""
    from hpcnlp.runtime.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # before the job allocates: else its memory climbs step after step (see there)
    spec = JOBS[cfg.job]
    path = spec.status_file(cfg)
    log = env.hpcnlp_setting("LOG")  # the Slurm log (slurm/launch.sh): `hpcnlp status` shows it
    status.update(path, state="running", job=cfg.job, reason=None, **({"log": log} if log else {}))
    try:
        code = int(spec.run(cfg) or 0)
        reason = {status.EXIT_REQUEUE: "checkpointed for requeue", status.EXIT_REJECTED: "rejected by the gate"}.get(code)
    except ConfigError as e:
        code, reason = report(e), e.lines[0]
    except BaseException as e:  # the traceback follows; status and the batch script say it failed
        status.update(path, state="failed", reason=f"{type(e).__name__}: {e}")
        status.record_outcome(status.EXIT_FAILED, False, f"{type(e).__name__}: {e}")
        raise
    finally:
        if cfg.output_dir:
            rundir.release(cfg.output_dir)  # the lock a training run took, if this process holds it
    requeue = code == status.EXIT_REQUEUE and env.slurm_restart_count() < getattr(cfg, "max_requeues", 0)
    if code == status.EXIT_REQUEUE and not requeue:
        reason = (f"checkpointed, but {env.slurm_restart_count()} requeues reached max_requeues "
                  f"({getattr(cfg, 'max_requeues', 0)}): resubmit (resume: auto) to continue")
    status.update(path, state=status.STATES.get(code, "failed"), reason=reason, **({"log": log} if log else {}))
    if code != EXIT_CONFIG and path is not None:
        status.link_log(log, path.parent)
    status.record_outcome(code, requeue, reason or status.STATES.get(code, "failed"))
    return code
