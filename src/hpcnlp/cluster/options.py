"""The cluster profile turned into what Slurm is given: sbatch options (the profile's, then the job's
own, which win), the environment slurm/launch.sh reads (HPCNLP_*), the job's name, and the process
group (nodes x processes per node) those options make.
"""

from __future__ import annotations

from pathlib import Path

from hpcnlp.cluster.profile import ClusterProfile
from hpcnlp.config import JobConfig
from hpcnlp.runtime import gres
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


def sbatch_options(
    profile: ClusterProfile, spec: JobSpec, name: str, array: bool = False, extra: list[str] = ()
) -> list[str]:
    """The profile as sbatch options for one job (its `jobs:` section over the top-level values); `extra`
    (per job or stage) wins. Single-process jobs (export, validate, prepare) get one node, and no GPU
    and the cpu_partition unless their `jobs:` section says otherwise (ClusterProfile.for_job)."""
    p = profile.for_job(spec.name, spec.single_process)
    array = array or any(option_name(o) in ("--array", "-a") for o in extra)  # any array job: one log per task
    single = spec.single_process
    gpus = p.gpus_per_node
    log = Path(p.log_dir).absolute() / ("%x-%A_%a.out" if array else "%x-%j.out")
    pairs = [
        ("job-name", name),
        ("account", p.account),
        ("partition", p.partition),
        ("qos", p.qos),
        ("nodes", None if single else p.nodes),
        ("gpus-per-node", gpus or None),
        ("cpus-per-task", p.cpus_per_task),
        ("mem", p.mem),
        ("time", p.time),
        ("mail-user", p.mail_user),
        ("mail-type", p.mail_type),
        ("output", log),
    ]
    return merge([f"--{k}={v}" for k, v in pairs if v is not None] + p.sbatch, list(extra))


def launch_env(profile: ClusterProfile, spec: JobSpec | None = None) -> dict[str, str]:
    """What slurm/launch.sh reads (HPCNLP_*), plus the profile's own variables; sbatch passes the
    submitting environment to the job (--export=ALL, Slurm's default)."""
    p = profile.for_job(spec.name, spec.single_process) if spec else profile
    out = {
        "HPCNLP_LAUNCHER": p.launcher if p.launcher != "torchrun" else None,
        "HPCNLP_CONTAINER": p.container if p.container != "none" else None,
        "HPCNLP_IMAGE": p.image,
        "HPCNLP_BIND": ",".join(p.binds) or None,
        "HPCNLP_NPROC_PER_NODE": str(p.nproc_per_node) if p.nproc_per_node else None,
        "HPCNLP_MODULES": " ".join(p.modules) or None,
        "HPCNLP_PASS_ENV": " ".join(p.env) or None,
    }  # podman passes only named variables
    return {**{k: v for k, v in out.items() if v is not None}, **p.env}


def nodes_requested(spec: JobSpec, options: list[str]) -> int:
    value = option_value(options, "--nodes") or option_value(options, "-N") or str(spec.slurm.nodes)
    return int(value.split("-")[0])  # --nodes=2-4: at least 2


def gpus_requested(options: list[str], nodes: int = 1) -> int:
    """GPUs per node the options ask for, in any form (--gpus-per-node, --gres, --gpus, --gpus-per-task):
    hpcnlp.runtime.gres, the reader the launcher uses inside the job too. 0: none."""
    tasks = option_value(options, "--ntasks-per-node")
    found = gres.per_node(
        gpus_per_node=option_value(options, "--gpus-per-node"),
        gres=option_value(options, "--gres"),
        gpus=option_value(options, "--gpus") or option_value(options, "-G"),
        gpus_per_task=option_value(options, "--gpus-per-task"),
        nodes=nodes,
        tasks_per_node=int(tasks) if tasks and tasks.isdigit() else 1,
    )
    return found or 0


def step_gpu_option(options: list[str], nodes: int = 1) -> str | None:
    """How the job's srun step will ask for its GPUs (as hpcnlp.runtime.launch does at run time)."""
    return gres.step_option(gpus_requested(options, nodes), option_value(options, "--gpus-per-node"))


def processes(profile: ClusterProfile, spec: JobSpec, options: list[str]) -> tuple[int, int]:
    """(nodes, processes per node) the job's launcher will start: as the launcher plans it at run time
    (HPCNLP_NPROC_PER_NODE, else the GPUs Slurm gave the node, else 1)."""
    profile = profile.for_job(spec.name, spec.single_process)
    nodes = 1 if spec.single_process else nodes_requested(spec, options)
    nproc = 1 if spec.single_process else profile.nproc_per_node or gpus_requested(options, nodes) or 1
    return nodes, nproc
