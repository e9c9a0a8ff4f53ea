"""What a job is: one `JobSpec` per job module (hpcnlp/jobs/<job>.py), found by the registry (hpcnlp.jobs).

The CLI, the Slurm launcher, submit/pipeline/sweep and `hpcnlp check` read these specs; nothing
else lists the jobs or knows what a finished run looks like. docs/architecture.md: adding a job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.config import JobConfig, Problem


@dataclass(frozen=True)
class SlurmDefaults:
    """The per-job #SBATCH header of slurm/<job>.sbatch (plain sbatch: users edit it there; submit,
    pipeline and sweep add the cluster profile's options, which win)."""

    nodes: int = 1
    time: str = "02:00:00"
    cpus_per_task: int = 8
    signal_seconds: int = 300  # USR1 this long before the time limit: checkpoint, then requeue
    note: str = ""  # one comment line in the header, e.g. what the CPU count is for


def metrics_written(cfg: JobConfig) -> bool:
    """The training and export jobs write metrics.json last: its presence marks a finished run."""
    return bool(cfg.output_dir) and (Path(cfg.output_dir) / "metrics.json").is_file()


@dataclass(frozen=True)
class JobSpec:
    name: str
    help: str  # one line, for `hpcnlp --help` and the batch template
    config: type[JobConfig]
    check: Callable[[JobConfig, Iterable[str]], list[Problem]]  # (cfg, pending paths) -> file/data problems
    run: Callable[[JobConfig], int]  # exit code; imports its heavy libraries itself (fast `hpcnlp check`)
    # One process on one node whatever GPUs it has (N copies would race on output_dir).
    single_process: bool = False
    slurm: SlurmDefaults = field(default_factory=SlurmDefaults)
    is_complete: Callable[[JobConfig], bool] = metrics_written
    # {metric, size, latency b1 p50, output} of a run; FileNotFoundError when it wrote no results
    summary_row: Callable[[JobConfig], dict] = lambda cfg: {}
    order: int = 100  # where it is listed (CLI help, docs): hpcnlp's own jobs in pipeline order, then others
    example_config: str = ""  # the shipped YAML named in docs and slurm/<job>.sbatch; default jobs/<name>.yaml
    # Training jobs checkpoint on Slurm's warning signal and requeue themselves; the others have
    # nothing to resume: their templates say --no-requeue.
    resumable: bool = False
    # Where the job says how it is doing (state, step, job ids, reason); None: nowhere
    status_file: Callable[[JobConfig], Path | None] = lambda cfg: Path(cfg.output_dir) / "status.json"
    # (cfg, processes) -> what a run of that many processes cannot do, known before queueing; None: nothing
    group_check: Callable[[JobConfig, int], list[Problem]] | None = None
    # (raw YAML mapping, its source) -> the mapping to validate: a config that takes keys from another
    # file (prepare's data_from); None: as written
    expand: Callable[[dict, str], dict] | None = None
    # Training jobs: cfg -> the config.json (or just its sizes) of the model trained, None when it cannot be
    # read yet; training.bf16: auto's probe times its matmuls (train/precision.py), at the job's start and
    # in `hpcnlp check`. None: the job trains nothing.
    model_config: Callable[[JobConfig], dict | None] | None = None

    @property
    def example(self) -> str:
        return self.example_config or f"jobs/{self.name}.yaml"
