"""The cluster profile turned into what Slurm is given: sbatch options (the profile's, then the job's
own, which win), the environment slurm/launch.sh reads (HPCNLP_*), the job's name, and the process
group (nodes x processes per node) those options make.
"""
from __future__ import annotations

from pathlib import Path

from hpcnlp.cluster.profile import ClusterProfile
from hpcnlp.config import JobConfig
from hpcnlp.spec import JobSpec


def job_name(cfg: JobConfig) -> str:
    """Which run a job is: the job and its output_dir's name (`pretrain-pydocs`, `finetune-sentiment`)."""
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is None or not out.name:
        return cfg.job
    name = out.name if out.name.startswith(cfg.job) else f"{cfg.job}-{out.name}"
    return f"{name}-{out.parent.name}" if out.name == cfg.job and out.parent.name else name


def option_name(option: str) -> str:
    return option.split("=", 1)[0]


def merge(base: list[str], overrides: list[str]) -> list[str]:
    """`overrides` win: an option of `base` given again there (same --name) is dropped."""
    given = {option_name(o) for o in overrides}
    return [o for o in base if option_name(o) not in given] + list(overrides)


def option_value(options: list[str], name: str) -> str | None:
    values = [o.split("=", 1)[1] for o in options if option_name(o) == name and "=" in o]
    return values[-1] if values else None


def sbatch_options(profile: ClusterProfile, spec: JobSpec, name: str, array: bool = False,
                   extra: list[str] = ()) -> list[str]:
    """The profile as sbatch options for one job; `extra` (per job or stage) wins. Single-process jobs
    (export, validate, prepare) get one node and at most one GPU whatever the profile says."""
    p = profile
    array = array or any(option_name(o) in ("--array", "-a") for o in extra)  # any array job: one log per task
    single = spec.single_process
    gpus = min(p.gpus_per_node, 1) if single else p.gpus_per_node
    log = Path(p.log_dir).absolute() / ("%x-%A_%a.out" if array else "%x-%j.out")
    pairs = [("job-name", name), ("account", p.account), ("partition", p.partition), ("qos", p.qos),
             ("nodes", None if single else p.nodes), ("gpus-per-node", gpus or None),
             ("cpus-per-task", p.cpus_per_task), ("mem", p.mem), ("time", p.time), ("mail-user", p.mail_user),
             ("mail-type", p.mail_type), ("output", log)]
    return merge([f"--{k}={v}" for k, v in pairs if v is not None] + p.sbatch, list(extra))


def launch_env(profile: ClusterProfile) -> dict[str, str]:
    """What slurm/launch.sh reads (HPCNLP_*), plus the profile's own variables; sbatch passes the
    submitting environment to the job (--export=ALL, Slurm's default)."""
    p = profile
    out = {"HPCNLP_LAUNCHER": p.launcher if p.launcher != "torchrun" else None,
           "HPCNLP_CONTAINER": p.container if p.container != "none" else None, "HPCNLP_IMAGE": p.image,
           "HPCNLP_BIND": ",".join(p.binds) or None,
           "HPCNLP_NPROC_PER_NODE": str(p.nproc_per_node) if p.nproc_per_node else None,
           "HPCNLP_MODULES": " ".join(p.modules) or None,
           "HPCNLP_PASS_ENV": " ".join(p.env) or None}  # podman passes only named variables
    return {**{k: v for k, v in out.items() if v is not None}, **p.env}


def gpus_requested(options: list[str]) -> int | None:
    """GPUs per node the options ask for; None when they say it another way (--gres, --gpus)."""
    if any(option_name(o) in ("--gres", "--gpus", "--gpus-per-task", "-G") for o in options):
        return None
    value = option_value(options, "--gpus-per-node")
    return int(value.split(":")[-1]) if value else 0


def processes(profile: ClusterProfile, spec: JobSpec, options: list[str]) -> tuple[int, int]:
    """(nodes, processes per node) the job's launcher will start."""
    nodes = 1 if spec.single_process else int(option_value(options, "--nodes") or spec.slurm.nodes)
    nproc = 1 if spec.single_process else profile.nproc_per_node or gpus_requested(options) or 1
    return nodes, nproc
