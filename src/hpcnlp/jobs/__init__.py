"""The job registry: every module of this package with a `SPEC` (hpcnlp.spec.JobSpec) is a job.

Nothing lists the jobs: the registry imports each module here, plus those of the packages named in
$HPCNLP_JOB_PACKAGES (comma-separated importable packages: a site's own jobs, no fork needed).
Adding a job: docs/architecture.md. The CLI, the launcher, submit/pipeline/sweep and `hpcnlp check`
all read JOBS.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Iterable

from hpcnlp.config import ConfigError, JobConfig, Problem, TrainingJobConfig, read_yaml, with_overrides
from hpcnlp.config import validate as validate_shape
from hpcnlp.runtime import env, rundir, stack, status
from hpcnlp.spec import JobSpec

log = logging.getLogger(__name__)

PACKAGES_VARIABLE = "HPCNLP_JOB_PACKAGES"


@functools.cache
def registry() -> dict[str, JobSpec]:
    """name -> spec of every job module, hpcnlp's own first (in pipeline order), then the site's."""
    packages = [__name__] + [p.strip() for p in os.environ.get(PACKAGES_VARIABLE, "").split(",") if p.strip()]
    found: dict[str, JobSpec] = {}
    for package in packages:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, f"{package}."):
            spec = getattr(importlib.import_module(info.name), "SPEC", None)
            if isinstance(spec, JobSpec):
                if spec.name in found:
                    raise RuntimeError(f"{info.name}: job '{spec.name}' is defined twice")
                found[spec.name] = spec
    return dict(sorted(found.items(), key=lambda kv: kv[1].order))


def __getattr__(name: str):
    # JOBS is built on first use: job modules import their siblings (pretrain -> finetune) through
    # this package, which must not import them all while it is itself being imported.
    if name == "JOBS":
        return registry()
    raise AttributeError(name)


EXIT_CONFIG = status.EXIT_CONFIG  # the config (or its data) was refused; nothing ran, nothing was written


def load_config(
    path, overrides: Iterable[str] = (), expect_job: str | None = None, pending: Iterable[str] = (), check: bool = True
) -> JobConfig:
    """Read, override, validate, and (with `check`) run the job's file checks. Raises ConfigError with
    every problem at once, before anything runs. `pending`: paths earlier pipeline stages will create."""
    source = str(path)
    raw = with_overrides(read_yaml(path), overrides)
    job = raw.get("job", expect_job)
    JOBS = registry()
    if job not in JOBS:
        close = difflib.get_close_matches(str(job), list(JOBS), n=1)
        raise ConfigError(
            source,
            [
                Problem(
                    key="job",
                    message=f"unknown job {job!r}",
                    fix=f"did you mean '{close[0]}'?" if close else f"set job: to one of {sorted(JOBS)}",
                )
            ],
        )
    if expect_job and job != expect_job:
        raise ConfigError(
            source,
            [
                Problem(
                    key="job",
                    message=f"this is a '{job}' config, not '{expect_job}'",
                    fix=f"run `hpcnlp {job}` or pass a {expect_job} config",
                )
            ],
        )
    spec = JOBS[job]
    if spec.expand:
        raw = spec.expand(raw, source)
    cfg = validate_shape(spec.config, {**raw, "job": job}, source)
    problems = cfg.problems()
    if check:
        problems += check_config(cfg, pending)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def check_config(cfg: JobConfig, pending: Iterable[str] = ()) -> list[Problem]:
    """The job's meaning checks (files, data, placement) of an already validated config: what
    load_config's `check` adds. `pending`: paths earlier pipeline stages will create."""
    spec = registry()[cfg.job]
    return spec.check(cfg, list(pending)) + _placement_problems(spec) + report_to_problems(cfg) + code_problems()


def _is_commit(version: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", version) is not None


def code_problems() -> list[Problem]:
    """A submitted job starts with the code it was submitted with (HPCNLP_SUBMITTED_CODE, set by submit):
    a checkout pulled or an image rebuilt while it waited would run code nobody checked the config with."""
    submitted, now = env.hpcnlp_setting("SUBMITTED_CODE"), env.code_version()
    if not submitted or submitted == now or env.hpcnlp_setting("ALLOW_CODE_CHANGE") == "1":
        return []
    if _is_commit(submitted) != _is_commit(now):
        # A commit and a package version cannot be compared (a pip-installed login node submitting into an
        # image built from a checkout): say so, refuse nothing.
        log.warning("code: submitted with %s, starts with %s (not comparable: one is a release)", submitted, now)
        return []
    return [
        Problem(
            key="code",
            message=f"the job was submitted with code {submitted} and starts with {now} "
            "(the checkout or image changed while it waited)",
            fix="resubmit it, or submit with --allow-code-change (HPCNLP_ALLOW_CODE_CHANGE=1)",
        )
    ]


# training.report_to: the integration -> (modules any one of which it needs, a tuple: all of them; what to
# pip install). mlflow's sqlite store needs sqlalchemy and alembic, which mlflow-skinny leaves out.
REPORTERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "'hpcnlp[wandb]'"),
    "mlflow": ((("mlflow", "sqlalchemy", "alembic"),), "'hpcnlp[mlflow]'"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "azure_ml": (("azureml.core",), "azureml-core"),
    "dagshub": (("dagshub",), "dagshub"),
    "dvclive": (("dvclive",), "dvclive"),
    "flyte": (("flytekit",), "flytekit"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}


def report_to_problems(cfg: JobConfig) -> list[Problem]:
    """training.report_to naming an integration whose package is not installed: the Trainer would fail
    at its first step, after the queue wait. "none" and "all" (whatever is installed) are fine."""
    import importlib.util

    training = getattr(cfg, "training", None)
    value = getattr(training, "report_to", None) if training is not None else None
    names = [value] if isinstance(value, str) else list(value or [])
    if names and not stack.installed():  # a login node: the integrations are the job's environment's
        stack.skipped("training.report_to")
        return []
    out = []
    for name in names:
        if name in ("none", "all", None):
            continue
        if name not in REPORTERS:
            out.append(
                Problem(
                    key="training.report_to",
                    message=f"unknown integration '{name}'",
                    fix=f"use none, all or one of {sorted(REPORTERS)}",
                )
            )
            continue
        modules, package = REPORTERS[name]

        def found(module: str | tuple[str, ...]) -> bool:
            if isinstance(module, tuple):
                return all(found(m) for m in module)
            try:
                return importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                return False

        if not any(found(m) for m in modules):
            out.append(
                Problem(
                    key="training.report_to",
                    message=f"'{name}' is not installed here",
                    fix=f"pip install {package} (into the environment or image the job runs in), "
                    "or remove it from report_to",
                )
            )
    return out


def _placement_problems(spec: JobSpec) -> list[Problem]:
    """Inside a Slurm allocation: a single-process job on several nodes would race on its output."""
    if spec.single_process and env.slurm_num_nodes() > 1:
        return [
            Problem(
                key="job",
                message=f"'{spec.name}' runs as one process on one node, this allocation "
                f"has {env.slurm_num_nodes()} nodes",
                fix="submit it with --nodes=1",
            )
        ]
    return []


def report(e: ConfigError) -> int:
    for line in e.lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def _complete(spec: JobSpec, cfg: JobConfig) -> bool:
    try:
        return spec.is_complete(cfg)
    except Exception:  # noqa: BLE001 - cannot tell: the refusal is recorded as usual
        return False


def run_job(cfg: JobConfig) -> int:
    """Run a checked config's job and say how it ended: status.json, the outcome line for the batch
    script, the exit code (hpcnlp.runtime.status). A ConfigError found only once the job reads its data
    (a column, a label, a file's format) is reported like a refused config: one line per problem, exit 2.
    A training run's status.json is written only by the process holding its lock (rundir): a start
    refused by the lock, or stopped before it took it, writes nothing into another run's status."""
    from hpcnlp.runtime import preempt
    from hpcnlp.runtime.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # before the job allocates: else its memory climbs step after step (see there)
    spec = registry()[cfg.job]
    path = spec.status_file(cfg)
    training = isinstance(cfg, TrainingJobConfig)
    log = env.hpcnlp_setting("LOG")  # the Slurm log (slurm/launch.sh): `hpcnlp status` shows it

    def mine() -> bool:  # may this process write the run's status.json
        return not training or rundir.holds(cfg.output_dir)

    signals = preempt.arm() if training else {}  # before the run dir is claimed: no signal kills us bare
    if not training:
        status.update(path, state="running", job=cfg.job, reason=None, **({"log": log} if log else {}))
    try:
        code = int(spec.run(cfg) or 0)
        reason = {status.EXIT_REQUEUE: "checkpointed for requeue", status.EXIT_REJECTED: "rejected by the gate"}.get(
            code
        )
    except rundir.Finished as e:
        code, reason = status.EXIT_OK, str(e)
        print(f"hpcnlp: {e}", file=sys.stderr)
    except ConfigError as e:
        code, reason = report(e), e.lines[0]
    except BaseException as e:  # the traceback follows; status and the batch script say it failed
        if mine():
            status.update(path, state="failed", reason=f"{type(e).__name__}: {e}")
        status.record_outcome(status.EXIT_FAILED, False, f"{type(e).__name__}: {e}")
        if cfg.output_dir:
            rundir.release(cfg.output_dir)
        preempt.disarm(signals)
        raise
    requeue = code == status.EXIT_REQUEUE and env.slurm_restart_count() < getattr(cfg, "max_requeues", 0)
    if code == status.EXIT_REQUEUE and not requeue:
        reason = (
            f"checkpointed, but {env.slurm_restart_count()} requeues reached max_requeues "
            f"({getattr(cfg, 'max_requeues', 0)}): resubmit (resume: auto) to continue"
        )
    if code == EXIT_CONFIG and _complete(spec, cfg):
        path = None  # refused because another run finished the same stage (a lost publish): its status stays
    if mine():
        status.update(path, state=status.STATES.get(code, "failed"), reason=reason, **({"log": log} if log else {}))
        if code != EXIT_CONFIG and path is not None:
            status.link_log(log, path.parent)
    if cfg.output_dir:
        rundir.release(cfg.output_dir)  # the lock a training run took, if this process holds it
    preempt.disarm(signals)
    status.record_outcome(code, requeue, reason or status.STATES.get(code, "failed"))
    return code
