"""One job on the cluster, planned: the sbatch options (profile, then the job's own), what the profile
cannot run, and the sbatch call itself. `hpcnlp check`, submit, pipeline, sweep and every --dry-run
go through plan(): a dry run prints what submit runs because it is the same code.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcnlp.cluster.options import (
    gpus_requested,
    job_name,
    launch_env,
    option_value,
    processes,
    sbatch_options,
    step_gpu_option,
)
from hpcnlp.cluster.profile import ClusterProfile, load_profile, profile_path
from hpcnlp.cluster.templates import batch_script, home
from hpcnlp.config import ConfigError, JobConfig, Problem
from hpcnlp.runtime import launch
from hpcnlp.runtime.env import code_version
from hpcnlp.runtime.io import atomic_write_text
from hpcnlp.spec import JobSpec

log = logging.getLogger("hpcnlp.check")


@dataclass
class Submission:
    """One sbatch call, complete: what a dry run prints is what is run."""

    name: str
    env: dict[str, str]  # set for sbatch (and so for the job) on top of the submitting environment
    argv: list[str]  # sbatch --parsable <options> <script> <args>
    launch: list[str]  # the srun line and the per-node launcher line (dry-run display)
    script: str | None = None  # the batch script's text, written to argv's script first (a site's own job)

    @property
    def log(self) -> str:
        return option_value(self.argv, "--output") or "slurm-%j.out"

    def command_line(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])

    def describe(self) -> str:
        return "\n".join(
            [
                f"  sbatch: {self.command_line()}",
                f"  srun:   {self.launch[0]}",
                f"  node:   {self.launch[1]}",
                f"  log:    {self.log.replace('%x', self.name)}",
            ]
        )

    def run(self) -> str:
        """sbatch -> job id; sbatch's own refusal becomes a SystemExit with its message."""
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)  # sbatch does not make it
        if self.script is not None:
            atomic_write_text(Path(self.argv[-2]), self.script)
        res = subprocess.run(self.argv, capture_output=True, text=True, env={**os.environ, **self.env})
        if res.returncode != 0:
            raise SystemExit(f"error: sbatch refused the job: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]


@dataclass
class Plan:
    options: list[str]  # sbatch options: the profile's, then the job's own (which win)
    problems: list[Problem]  # what cannot work where the options send the job: submit refuses it
    deferred: list[Problem]  # the process group's problems excused by `data_pending` (check warns of them)
    submission: Submission
    source: str

    def checked(self) -> Submission:
        """The sbatch call, or a ConfigError with every problem when the profile cannot run the job."""
        if self.problems:
            raise ConfigError(f"{self.source} (sent with {' '.join(self.options)})", self.problems)
        return self.submission


def plan(
    cfg: JobConfig,
    spec: JobSpec,
    profile: ClusterProfile,
    config: Path | str,
    source: str,
    sbatch_args: list[str] = (),
    array: str | None = None,
    env: dict | None = None,
    data_pending: bool = False,
) -> Plan:
    """The sbatch call for a checked config (`config`: the file the job reads, `source`: where it came
    from, for errors), with the profile's problems. `array`: an --array=... option; `env`: more variables
    for the job; `data_pending`: an earlier pipeline stage prepares the corpus (see profile_problems)."""
    name = job_name(cfg)
    profile = profile.for_job(spec.name, spec.single_process)  # its `jobs:` section over the top-level values
    options = sbatch_options(profile, spec, name, array=bool(array), extra=[*([array] if array else []), *sbatch_args])
    group = group_problems(cfg, spec, options, profile)
    problems = profile_problems(cfg, options, [] if data_pending else group)
    # The batch script finds slurm/launch.sh by HPCNLP_HOME.
    # HPCNLP_SUBMITTED_CODE: the job refuses to start from other code (hpcnlp.jobs.code_problems).
    env = {"HPCNLP_HOME": str(home()), "HPCNLP_SUBMITTED_CODE": code_version(), **launch_env(profile), **(env or {})}
    script, text = batch_script(spec)
    sub = Submission(
        name,
        env,
        ["sbatch", "--parsable", *options, str(script), str(config)],
        launch_lines(profile, spec, [str(config)], options, home()),
        text,
    )
    return Plan(options, problems, group if data_pending else [], sub, source)


def group_problems(cfg: JobConfig, spec: JobSpec, options: list[str], profile: ClusterProfile) -> list[Problem]:
    """What the job's process group (nodes x processes per node, from the options) cannot do."""
    nodes, nproc = processes(profile, spec, options)
    return spec.group_check(cfg, nodes * nproc) if spec.group_check and nodes * nproc > 1 else []


def profile_problems(cfg: JobConfig, options: list[str], group: list[Problem]) -> list[Problem]:
    """Settings of a job that cannot work where it is sent: fp16 without a GPU; what the job's process
    group cannot do (`group`: a pretrain group never tokenizes, its prepared data must exist, unless an
    earlier pipeline stage prepares it). bf16 runs on CPUs too, under the Trainer's autocast; whether it
    pays there is measured (training.bf16: auto; `hpcnlp check` says what the CPU it runs on picks)."""
    training = getattr(cfg, "training", None)
    gpus = gpus_requested(options, int((option_value(options, "--nodes") or "1").split("-")[0]))
    if gpus != 0 or training is None or not getattr(training, "fp16", False):
        return list(group)
    return [
        *group,
        Problem(
            key="training.fp16",
            message="is on, but the job gets no GPU (CPU-only profile or no --gpus-per-node)",
            fix="set training.fp16: false (training.bf16 works on CPUs), or gpus_per_node in the cluster profile",
        ),
    ]


def launch_lines(
    profile: ClusterProfile, spec: JobSpec, job_args: list[str], options: list[str], home: Path
) -> list[str]:
    """What the batch script will run, as far as it is known before the job starts: the srun line with
    its container wrapper, and the launcher each node execs (rank, rendezvous filled in at run time)."""
    nodes, nproc = processes(profile, spec, options)
    gpus = gpus_requested(options, nodes)
    # The step's CPUs: the allocation's cpus-per-task (the options', else the batch header's)
    cpus = option_value(options, "--cpus-per-task") or spec.slurm.cpus_per_task
    # The interpreter slurm/launch.sh will pick: HPCNLP_PYTHON, python3 in an image, else the checkout's .venv.
    venv = home / ".venv" / "bin" / "python"
    python = os.environ.get("HPCNLP_PYTHON") or (
        "python3" if profile.container != "none" else str(venv) if venv.is_file() else "python3"
    )
    plan = launch.Plan(
        job=spec.name,
        job_args=["--config", *job_args],
        nnodes=nodes,
        nproc_per_node=nproc,
        launcher=profile.launcher,
        container=profile.container,
        image=profile.image,
        python=python,
        workdir=os.getcwd(),
        binds=profile.binds,
        gpus=gpus,
        pass_env=list(profile.env),
        cpus_per_task=cpus,
        gpu_option=step_gpu_option(options, nodes),
    )
    # Not known before the job has its nodes: the rendezvous and each node's rank.
    node = launch.node_command(
        profile.launcher,
        nodes,
        nproc,
        "$SLURM_NODEID",
        "<first node>",
        "<port>",
        spec.name,
        plan.job_args,
        python=python,
    )
    return [shlex.join(launch.srun_command(plan, master="<first node>:<port>")), shlex.join(node)]


def check_on_profile(cfg: JobConfig, spec: JobSpec, source: str) -> None:
    """`hpcnlp check`: the config must also be one the cluster profile can run. Not inside a job, where
    the allocation is what it is (submit checked the options it was given, --sbatch ones included).
    Data a prepare run may still make is a warning here (submit refuses it, unless an earlier pipeline
    stage prepares it): checking a config never depends on having run one."""
    path = profile_path()
    if not path or os.environ.get("SLURM_JOB_ID"):
        return
    planned = plan(cfg, spec, load_profile(), source, source, data_pending=True)
    for p in planned.deferred:
        log.warning("%s: %s. Fix: %s", p.key, p.message, p.fix)
    if planned.problems:
        raise ConfigError(f"{source} (with cluster profile {path})", planned.problems)


def refused(e: ConfigError, queueing: bool = True) -> int:
    """A command's ConfigError: one line per problem; exit 2."""
    for line in e.lines:
        print(f"error: {line}", file=sys.stderr)
    if queueing:
        print("error: nothing was queued", file=sys.stderr)
    return 2
