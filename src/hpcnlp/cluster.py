"""The cluster profile (config.ClusterProfile) turned into what Slurm is given: sbatch options, the
environment slurm/launch.sh reads (HPCNLP_*), the job's name and log path, and the per-node launch
line a dry run prints. One place, so submit, pipeline, sweep and their dry runs agree.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from hpcnlp.config import ClusterProfile, ConfigError, JobConfig, Problem, _shape_problems, read_yaml
from hpcnlp.runtime import launch
from hpcnlp.spec import JobSpec

DEFAULT_PROFILE = "jobs/cluster.yaml"


def profile_path() -> Path | None:
    """$HPCNLP_CLUSTER, else jobs/cluster.yaml in the working dir; None: no profile (the defaults)."""
    if os.environ.get("HPCNLP_CLUSTER"):
        return Path(os.environ["HPCNLP_CLUSTER"])
    return Path(DEFAULT_PROFILE) if Path(DEFAULT_PROFILE).is_file() else None


def load_profile(path: str | Path | None = None) -> ClusterProfile:
    path = path or profile_path()
    if path is None:
        return ClusterProfile()
    try:
        profile = ClusterProfile.model_validate(read_yaml(path))
    except ValidationError as e:
        raise ConfigError(str(path), _shape_problems(ClusterProfile, e)) from None
    if profile.problems():
        raise ConfigError(str(path), profile.problems())
    return profile


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


def group_problems(cfg: JobConfig, options: list[str], profile: ClusterProfile) -> list[Problem]:
    """What the job's process group (nodes x processes per node, from the options) cannot do."""
    from hpcnlp.jobs import JOBS

    spec = JOBS[cfg.job]
    nodes, nproc = processes(profile, spec, options)
    return spec.group_check(cfg, nodes * nproc) if spec.group_check and nodes * nproc > 1 else []


def profile_problems(cfg: JobConfig, options: list[str], profile: ClusterProfile,
                     data_pending: bool = False) -> list[Problem]:
    """Settings of a job that cannot work where it is sent: fp16 without a GPU; what the job's process
    group cannot do (a pretrain group never tokenizes: its prepared data must exist, or `data_pending`,
    an earlier pipeline stage prepares it). bf16 runs on CPUs too, under the Trainer's autocast, and
    pays where they have AMX: `hpcnlp check` advises on the CPU it runs on."""
    out = [] if data_pending else group_problems(cfg, options, profile)
    training = getattr(cfg, "training", None)
    if gpus_requested(options) != 0 or training is None or not getattr(training, "fp16", False):
        return out
    return out + [Problem(key="training.fp16", message="is on, but the job gets no GPU (CPU-only profile or no "
                          "--gpus-per-node)", fix="set training.fp16: false (training.bf16 works on CPUs), or "
                          "gpus_per_node in the cluster profile")]


def launch_lines(profile: ClusterProfile, spec: JobSpec, job_args: list[str], options: list[str],
                 home: Path) -> list[str]:
    """What the batch script will run, as far as it is known before the job starts: the srun line with
    its container wrapper, and the launcher each node execs (rank, rendezvous filled in at run time)."""
    nodes, nproc = processes(profile, spec, options)
    gpus = gpus_requested(options) or 0
    # The interpreter slurm/launch.sh will pick: HPCNLP_PYTHON, python3 in an image, else the checkout's .venv.
    venv = home / ".venv" / "bin" / "python"
    python = os.environ.get("HPCNLP_PYTHON") or ("python3" if profile.container != "none"
                                                 else str(venv) if venv.is_file() else "python3")
    plan = launch.Plan(job=spec.name, job_args=["--config", *job_args], nnodes=nodes, nproc_per_node=nproc,
                       master_addr="<first node>", master_port="<port>", launcher=profile.launcher,  # type: ignore
                       container=profile.container, image=profile.image, python=python, workdir=os.getcwd(),
                       binds=profile.binds, gpus=gpus, pass_env=list(profile.env))
    node = launch.node_command(profile.launcher, nodes, nproc, "$SLURM_NODEID", "<first node>", "<port>",  # type: ignore
                               spec.name, plan.job_args, python=python)
    return [launch.shlex.join(launch.srun_command(plan)), launch.shlex.join(node)]
