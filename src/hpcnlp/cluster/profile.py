"""The cluster profile: how jobs run on this cluster (not what they learn). `jobs/cluster.yaml`, or the
file in $HPCNLP_CLUSTER; no file: the defaults (CPU-only, no account, no container).

hpcnlp.cluster.options renders it into sbatch options and the HPCNLP_* variables slurm/launch.sh reads;
hpcnlp.cluster.plan checks a job against it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from hpcnlp.config import ConfigError, Problem, Section, read_yaml, shape_problems

DEFAULT_PROFILE = "jobs/cluster.yaml"


class ClusterProfile(Section):
    """`jobs/cluster.yaml` (or the file in $HPCNLP_CLUSTER). `hpcnlp submit`, `pipeline` and `sweep`
    render it into sbatch options (hpcnlp.cluster.options.sbatch_options); options given per job or stage win."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    nodes: int | None = Field(None, ge=1)  # for the multi-node jobs; default: the job's template header
    gpus_per_node: int = Field(0, ge=0)  # 0: a CPU-only cluster
    nproc_per_node: int | None = Field(None, ge=1)  # processes per node; default: gpus_per_node, else 1
    cpus_per_task: int | None = Field(None, ge=1)  # CPUs of the one task per node; default: the header's
    mem: str | None = None  # per node, as sbatch --mem takes it: 64G
    time: str | None = None  # as sbatch --time takes it: 04:00:00, 1-00:00:00
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

    def processes(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def problems(self) -> list[Problem]:
        out = []
        if self.container != "none" and not self.image:
            out.append(Problem(key="image", message=f"container '{self.container}' needs an image",
                               fix="set image: (a .sif file for apptainer, an image name for pyxis/podman)"))
        if self.gpus_per_node and self.processes() > self.gpus_per_node:
            out.append(Problem(key="nproc_per_node", message=f"{self.processes()} processes per node but only "
                               f"{self.gpus_per_node} GPUs", fix="set nproc_per_node to gpus_per_node or less"))
        for key in self.env:
            if not key.isidentifier():
                out.append(Problem(key=f"env.{key}", message="not an environment variable name",
                                   fix="use letters, digits and _"))
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
    if profile.problems():
        raise ConfigError(str(path), profile.problems())
    return profile
