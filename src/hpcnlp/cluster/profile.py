"""The cluster profile: how jobs run on this cluster (not what they learn). `jobs/cluster.yaml`, or the
file in $HPCNLP_CLUSTER; no file: the defaults (CPU-only, no account, no container).

hpcnlp.cluster.options renders it into sbatch options and the HPCNLP_* variables slurm/launch.sh reads;
hpcnlp.cluster.plan checks a job against it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from hpcnlp.config import ConfigError, Problem, Section, read_yaml, shape_problems

DEFAULT_PROFILE = "jobs/cluster.yaml"


# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; UNLIMITED/INFINITE
TIME_FORMAT = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}")
TIME_WORDS = ("UNLIMITED", "INFINITE")
URI_SCHEMES = (
    "docker://",
    "library://",
    "oras://",
    "shub://",
    "docker-archive:",
    "oci-archive:",
    "http://",
    "https://",
)


def time_problem(value: str | None) -> str | None:
    """Why `value` is not a Slurm time limit (with the fix), or None when it is one (or unset)."""
    if value is None:
        return None
    text = str(value).strip()
    if TIME_FORMAT.fullmatch(text) or text.upper() in TIME_WORDS:
        return None
    m = re.fullmatch(r"(\d+)\s*(d|h|m|min|s)", text, re.I)
    hint = ""
    if m:
        n, unit = int(m[1]), m[2].lower()
        hint = {
            "d": f"{n}-00:00:00",
            "h": f"{n // 24}-{n % 24:02d}:00:00" if n >= 24 else f"{n:02d}:00:00",
            "m": str(n),
            "min": str(n),
            "s": f"00:{n // 60:02d}:{n % 60:02d}" if n < 3600 else "",
        }[unit]
    return (
        f"'{text}' is not a Slurm time limit; write "
        + (f"'{hint}' (" if hint else "")
        + "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED"
        + (")" if hint else "")
    )


class JobResources(Section):
    """`jobs: {<job>: {...}}` in the profile: what one job gets, over the profile's top-level values."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    nproc_per_node: int | None = Field(None, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | int | None = None
    sbatch: list[str] | None = None  # replaces the profile's sbatch list for this job when given


class ClusterProfile(Section):
    """`jobs/cluster.yaml` (or the file in $HPCNLP_CLUSTER). `hpcnlp submit`, `pipeline` and `sweep`
    render it into sbatch options (hpcnlp.cluster.options.sbatch_options); options given per job or stage win."""

    account: str | None = None
    partition: str | None = None
    # Partition of the single-process post-processing jobs (prepare, export, validate: no GPU unless their
    # `jobs:` section asks for one); None: the same partition as the others
    cpu_partition: str | None = None
    qos: str | None = None
    nodes: int | None = Field(None, ge=1)  # for the multi-node jobs; default: the job's template header
    gpus_per_node: int = Field(0, ge=0)  # 0: a CPU-only cluster
    nproc_per_node: int | None = Field(None, ge=1)  # processes per node; default: gpus_per_node, else 1
    cpus_per_task: int | None = Field(None, ge=1)  # CPUs of the one task per node; default: the header's
    mem: str | None = None  # per node, as sbatch --mem takes it: 64G
    time: str | int | None = None  # as sbatch --time takes it: 04:00:00, 1-00:00:00
    mail_user: str | None = None
    mail_type: str | None = None  # e.g. END,FAIL
    launcher: Literal["torchrun", "accelerate"] = "torchrun"
    container: Literal["none", "apptainer", "singularity", "pyxis", "podman"] = "none"
    image: str | None = None  # .sif file (apptainer), image name (pyxis, podman)
    binds: list[str] = Field(default_factory=list)  # extra dirs mounted into the container (data, scratch)
    env: dict[str, str] = Field(default_factory=dict)  # set for the job: NCCL_*, TORCH_*, proxies
    modules: list[str] = Field(default_factory=list)  # `module load`ed before the job starts
    log_dir: str = "outputs/logs"  # <log_dir>/<job name>-<job id>.out (arrays: -<array id>_<task>.out)
    sbatch: list[str] = Field(default_factory=list)  # any other option, e.g. [--constraint=a100]
    # Per job, over the values above: {prepare: {partition: cpu, gpus_per_node: 0, cpus_per_task: 16}, ...}
    jobs: dict[str, JobResources] = Field(default_factory=dict)

    def for_job(self, name: str, single_process: bool = False) -> ClusterProfile:
        """The profile as one job gets it: its `jobs:` section over the top-level values. Single-process
        jobs (prepare, export, validate) get no GPU and the cpu_partition unless their section says
        otherwise (their GPU options in `sbatch:` are dropped too)."""
        own = self.jobs.get(name) or JobResources()
        base = self.model_dump()  # `jobs` kept: applying it twice gives the same profile
        if single_process:
            from hpcnlp.runtime.gres import is_gpu_option

            base.update(
                gpus_per_node=0,
                nproc_per_node=None,
                partition=self.cpu_partition or self.partition,
                sbatch=[o for o in self.sbatch if not is_gpu_option(o)],
            )
        base.update({k: v for k, v in own.model_dump().items() if v is not None})
        return ClusterProfile(**base)

    def processes(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def problems(self) -> list[Problem]:
        out = []
        if self.container != "none" and not self.image:
            out.append(
                Problem(
                    key="image",
                    message=f"container '{self.container}' needs an image",
                    fix="set image: (a .sif file for apptainer, an image name for pyxis/podman)",
                )
            )
        elif self.container in ("apptainer", "singularity") and not self.image.startswith(URI_SCHEMES):
            path = Path(self.image).expanduser()
            if not path.is_file():
                out.append(
                    Problem(
                        key="image",
                        message=f"'{self.image}' is "
                        + ("a directory, not an image file" if path.is_dir() else "not a file")
                        + f" ({self.container} needs a .sif file "
                        "or an image URI)",
                        fix="give the path of the .sif file (absolute, seen from "
                        "the nodes) or a docker://, library:// or oras:// URI",
                    )
                )
        if self.gpus_per_node and self.processes() > self.gpus_per_node:
            out.append(
                Problem(
                    key="nproc_per_node",
                    message=f"{self.processes()} processes per node but only {self.gpus_per_node} GPUs",
                    fix="set nproc_per_node to gpus_per_node or less",
                )
            )
        for key, value in [("time", self.time), *((f"jobs.{n}.time", j.time) for n, j in self.jobs.items())]:
            if isinstance(value, int) and not isinstance(value, bool):
                out.append(
                    Problem(
                        key=key,
                        message=f"is the number {value} (YAML reads an unquoted 12:00:00 as seconds in base 60)",
                        fix=f'quote it: {key.split(".")[-1]}: "12:00:00" (minutes: "60")',
                    )
                )
            elif time_problem(value):
                why, _, how = time_problem(value).partition("; ")
                out.append(Problem(key=key, message=why, fix=how))
        for name, own in self.jobs.items():
            gpus = own.gpus_per_node if own.gpus_per_node is not None else self.gpus_per_node
            nproc = own.nproc_per_node or self.nproc_per_node
            if gpus and nproc and nproc > gpus:
                out.append(
                    Problem(
                        key=f"jobs.{name}.nproc_per_node",
                        message=f"{nproc} processes per node but only {gpus} GPUs",
                        fix="set nproc_per_node to gpus_per_node or less",
                    )
                )
        for key in self.env:
            if not key.isidentifier():
                out.append(
                    Problem(
                        key=f"env.{key}", message="not an environment variable name", fix="use letters, digits and _"
                    )
                )
        return out


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
        raise ConfigError(str(path), shape_problems(ClusterProfile, e)) from None
    problems = profile.problems() + unknown_jobs(profile)
    if problems:
        raise ConfigError(str(path), problems)
    return profile


def unknown_jobs(profile: ClusterProfile) -> list[Problem]:
    """`jobs:` sections naming no job of the registry."""
    import difflib

    from hpcnlp.jobs import registry

    known = list(registry())
    out = []
    for name in profile.jobs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            out.append(
                Problem(
                    key=f"jobs.{name}",
                    message="no such job",
                    fix=f"did you mean '{close[0]}'?" if close else f"use one of {known}",
                )
            )
    return out
