"""The batch scripts: slurm/<job>.sbatch, each the job's #SBATCH header (from its spec) and one line
calling the shared slurm/launch.sh. `make templates` writes them for every job in the registry; a job
with no slurm/<job>.sbatch (a site's own, from $HPCNLP_JOB_PACKAGES) gets its script rendered into the
state dir when it is submitted.
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcnlp.jobs import registry
from hpcnlp.spec import JobSpec


def home() -> Path:
    """Where slurm/ lives: $HPCNLP_HOME, else the working dir when it has slurm/, else this checkout."""
    if os.environ.get("HPCNLP_HOME"):
        return Path(os.environ["HPCNLP_HOME"])
    if (Path.cwd() / "slurm" / "launch.sh").is_file():
        return Path.cwd()
    return Path(__file__).resolve().parents[3]


def state_dir() -> Path:
    """Where submit keeps its state (frozen configs, rendered scripts) and launch.sh its flag files:
    $HPCNLP_STATE_DIR, else outputs/.slurm in the working dir."""
    return Path(os.environ.get("HPCNLP_STATE_DIR") or Path.cwd() / "outputs" / ".slurm")


def render_template(spec: JobSpec) -> str:
    """slurm/<job>.sbatch: the job's #SBATCH header (from its spec), then the one shared launcher."""
    s = spec.slurm
    procs = (
        "one process, whatever GPUs the node has"
        if spec.single_process
        else "one launcher per node; it starts one process per GPU"
    )
    return "\n".join(
        [
            "#!/bin/bash",
            f"# hpcnlp {spec.name}: {spec.help}.",
            f"#   sbatch slurm/{spec.name}.sbatch {spec.example} [key=value ...]"
            "    (from the repo root; or: hpcnlp submit)",
            "# `hpcnlp submit` renders the cluster profile (jobs/cluster.yaml: account, partition, GPUs, container...)",
            "# into sbatch options that win over these lines. Plain sbatch: edit the lines below; launcher and image",
            "# are HPCNLP_* variables (docs/slurm.md), e.g. sbatch --export=ALL,HPCNLP_IMAGE=hpcnlp.sif ...",
            f"# Written by `make templates` from the job's spec (src/hpcnlp/jobs/{spec.name}.py).",
            f"#SBATCH --job-name=hpcnlp-{spec.name}",
            f"#SBATCH --nodes={s.nodes}",
            f"#SBATCH --ntasks-per-node=1            # {procs}",
            f"#SBATCH --cpus-per-task={s.cpus_per_task}" + (f"             # {s.note}" if s.note else ""),
            "##SBATCH --gpus-per-node=4             # plain sbatch on GPU nodes: uncomment (submit: gpus_per_node)",
            "##SBATCH --partition=gpu               # (submit: partition)",
            f"#SBATCH --time={s.time}",
            "#SBATCH --output=%x-%j.out",
            *(
                [
                    "#SBATCH --open-mode=append             # a requeued run appends to the same log",
                    "#SBATCH --requeue",
                    f"#SBATCH --signal=B:USR1@{s.signal_seconds}"
                    "            # before the time limit: checkpoint, then requeue",
                ]
                if spec.resumable
                else ["#SBATCH --no-requeue                  # nothing to resume: a failed run is rerun by hand"]
            ),
            f'exec "${{HPCNLP_HOME:-$SLURM_SUBMIT_DIR}}/slurm/launch.sh" {spec.name} "$@"',
            "",
        ]
    )


def write_templates(root: Path | None = None) -> list[Path]:
    """`make templates`: slurm/<job>.sbatch for every job in the registry."""
    out = []
    for spec in registry().values():
        path = (root or home()) / "slurm" / f"{spec.name}.sbatch"
        path.write_text(render_template(spec))
        path.chmod(0o755)
        out.append(path)
    return out


def batch_script(spec: JobSpec) -> tuple[Path, str | None]:
    """The job's batch script and, when it must be written first, its text: slurm/<job>.sbatch as it is,
    else (a job of a site's package, which has none) its template rendered at
    <state dir>/templates/<job>.sbatch, written when the job is submitted."""
    path = home() / "slurm" / f"{spec.name}.sbatch"
    if path.is_file():
        return path, None
    return state_dir().absolute() / "templates" / f"{spec.name}.sbatch", render_template(spec)
