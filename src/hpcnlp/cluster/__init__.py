"""Slurm: the cluster profile, and the commands that queue jobs on it, validated first.

  profile    the cluster profile (jobs/cluster.yaml, $HPCNLP_CLUSTER): ClusterProfile, load_profile
  options    the profile as sbatch options and the HPCNLP_* variables slurm/launch.sh reads
  plan       one job planned: options, what the profile cannot run, the sbatch call (check, submit,
             pipeline, sweep and their dry runs all use it)
  templates  the batch scripts slurm/<job>.sbatch (`make templates`)
  jobs_alive what Slurm says of the jobs a run recorded: status, cancel, the duplicate-submission guard
  doctor     `hpcnlp doctor`: what a job would get on this node (GPUs, driver, NCCL, InfiniBand, CPUs)

One module per command, each with add_parser(subparsers) and main(args) -> exit code: COMMANDS.
"""

from __future__ import annotations

from hpcnlp.cluster import cancel, doctor, logs, pipeline, status, submit, summary, sweep, sync

COMMANDS = {
    "submit": submit,
    "pipeline": pipeline,
    "sweep": sweep,
    "status": status,
    "summary": summary,
    "cancel": cancel,
    "logs": logs,
    "doctor": doctor,
    "sync": sync,
}
