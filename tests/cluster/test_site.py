"""A real site, not a friendly one: what a production Slurm does that a test cluster forgives (srun's
CPUs since 22.05, GRES forms, per-job partitions, duplicate submissions, stale status, cancel/logs).
Fake Slurm tools only (tests/fake_slurm/), no training."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from hpcnlp.cli import main
from hpcnlp.cluster import options
from hpcnlp.cluster.profile import ClusterProfile, load_profile
from hpcnlp.config import ConfigError
from hpcnlp.jobs import JOBS
from hpcnlp.runtime import launch

REPO = Path(__file__).resolve().parents[2]
SLURM_VARS = ("SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS",
              "SLURM_GPUS_PER_TASK", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE",
              "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def allocation(monkeypatch):
    """Inside a (fake) allocation on nodes n1, n2: set more SLURM_* with monkeypatch.setenv."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("HPCNLP_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(launch, "_scontrol", lambda *a: "NodeAddr=10.0.0.1" if a[:2] == ("show", "node") else "n1 n2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    return monkeypatch


# --- 1. the srun step gets the allocation's CPUs and GPUs ------------------------------------------
def test_srun_step_passes_cpus_per_task_and_the_gpus(allocation):
    allocation.setenv("SLURM_CPUS_PER_TASK", "32")
    allocation.setenv("SLURM_GPUS_PER_NODE", "a100:4")
    allocation.setenv("SLURM_GPUS_ON_NODE", "4")
    plan = launch.plan_from_env("pretrain", ["--config", "x.yaml"])
    srun = launch.srun_command(plan)
    head = srun[:srun.index("hpcnlp.runtime.launch")]
    assert "--cpus-per-task=32" in head and "--gpus-per-node=a100:4" in head
    assert "export SRUN_CPUS_PER_TASK=32" in launch.bash_assignments(plan).splitlines()
    # No --cpus-per-task on the allocation: the node's CPUs are the one task's
    allocation.delenv("SLURM_CPUS_PER_TASK")
    allocation.setenv("SLURM_CPUS_ON_NODE", "64")
    allocation.delenv("SLURM_GPUS_PER_NODE")  # --gres=gpu:4: the step still asks for its 4 GPUs
    srun = launch.srun_command(launch.plan_from_env("pretrain", []))
    assert "--cpus-per-task=64" in srun and "--gpus-per-node=4" in srun
    # A CPU-only allocation asks for no GPU
    allocation.delenv("SLURM_GPUS_ON_NODE")
    assert not any("gpu" in a for a in launch.srun_command(launch.plan_from_env("pretrain", []))[:8])


def test_srun_line_of_the_dry_run_has_the_cpus_and_gpus(tmp_path):
    from hpcnlp.cluster.plan import launch_lines

    profile = ClusterProfile(gpus_per_node=4, cpus_per_task=32)
    opts = options.sbatch_options(profile, JOBS["pretrain"], "p")
    srun = shlex.split(launch_lines(profile, JOBS["pretrain"], ["x.yaml"], opts, tmp_path)[0])
    assert "--cpus-per-task=32" in srun and "--gpus-per-node=4" in srun
    # No cpus_per_task in the profile: the batch header's
    srun = launch_lines(ClusterProfile(), JOBS["export"], ["x.yaml"], options.sbatch_options(ClusterProfile(),
                        JOBS["export"], "e"), tmp_path)[0]
    assert f"--cpus-per-task={JOBS['export'].slurm.cpus_per_task}" in srun and "gpu" not in srun.split("python")[0]


# --- 2. one GPU reader: the dry run plans what the launcher starts ----------------------------------
@pytest.mark.parametrize("sbatch,env,expect", [
    (["--gres=gpu:4"], {"SLURM_GPUS_ON_NODE": "4"}, 4),
    (["--gres=gpu:a100:4"], {"SLURM_JOB_GPUS": "0,1,2,3"}, 4),
    (["--gres=gpu:a100:2,nvme:1"], {"SLURM_GPUS_ON_NODE": "2"}, 2),
    (["--gpus-per-node=4"], {"SLURM_GPUS_PER_NODE": "4"}, 4),
    (["--gpus-per-node=h100:4"], {"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
    (["--gpus=8", "--nodes=2"], {"SLURM_GPUS": "8"}, 4),
    (["--gpus-per-task=4"], {"SLURM_GPUS_PER_TASK": "4"}, 4),
    (["--gpus-per-task=a100:2"], {"SLURM_GPUS_PER_TASK": "a100:2"}, 2),
])
def test_dry_run_and_launcher_read_the_same_gpu_count(sbatch, env, expect, allocation):
    profile = ClusterProfile(sbatch=sbatch)
    opts = options.sbatch_options(profile, JOBS["pretrain"], "p")
    assert options.processes(profile, JOBS["pretrain"], opts) == (2, expect)
    for k, v in env.items():
        allocation.setenv(k, v)
    assert launch.plan_from_env("pretrain", []).nproc_per_node == expect


# --- 4. per-job resources; post-processing jobs on CPUs -------------------------------------------
def test_post_processing_jobs_get_no_gpu_and_the_cpu_partition():
    profile = ClusterProfile(partition="gpu", cpu_partition="cpu", gpus_per_node=4, cpus_per_task=32, time="12:00:00",
                             sbatch=["--gres=gpu:4", "--constraint=h100"],
                             jobs={"prepare": {"cpus_per_task": 16, "mem": "64G", "time": "04:00:00"},
                                   "validate": {"gpus_per_node": 1, "partition": "gpu"}})
    got = {job: options.sbatch_options(profile, JOBS[job], job) for job in JOBS}
    for job in ("export", "prepare"):
        assert not any(o.startswith(("--gpus", "--gres")) for o in got[job]), got[job]
        assert "--partition=cpu" in got[job] and "--constraint=h100" in got[job]
    assert {"--cpus-per-task=16", "--mem=64G", "--time=04:00:00"} <= set(got["prepare"])
    assert {"--partition=gpu", "--gpus-per-node=1"} <= set(got["validate"])  # its section asks for one
    for job in ("pretrain", "finetune", "distill"):
        assert {"--partition=gpu", "--gpus-per-node=4", "--gres=gpu:4", "--cpus-per-task=32"} <= set(got[job])
    # No cpu_partition: the same partition, still no GPU
    same = options.sbatch_options(ClusterProfile(partition="gpu", gpus_per_node=4), JOBS["export"], "e")
    assert "--partition=gpu" in same and not any(o.startswith(("--gpus", "--gres")) for o in same)


def test_profile_jobs_section_is_checked(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"jobs": {"exprt": {"partition": "cpu"}, "export": {"gpu": 1}}}))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert "jobs.export.gpu: unknown key" in str(e.value)
    path.write_text(yaml.safe_dump({"jobs": {"exprt": {"partition": "cpu"}}}))
    with pytest.raises(ConfigError, match="jobs.exprt: no such job. Fix: did you mean 'export'"):
        load_profile(path)


# --- 10. time strings and container images ----------------------------------------------------------
@pytest.mark.parametrize("value", ["60", "30:00", "12:00:00", "1-12", "1-12:30", "2-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(value):
    assert not ClusterProfile(time=value, jobs={"export": {"time": value}}).problems()


def test_bad_time_and_missing_image_are_refused(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("time: 12h\njobs: {export: {time: 12:00:00}}\ncontainer: apptainer\nimage: /no/such.sif\n")
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    lines = "\n".join(e.value.lines)
    assert "time: '12h' is not a Slurm time limit. Fix: write '12:00:00'" in lines
    assert "jobs.export.time: is the number 43200" in lines and 'quote it' in lines
    assert "image: '/no/such.sif' is not a file" in lines
    (tmp_path / "img").mkdir()
    assert "a directory" in str(ClusterProfile(container="singularity", image=str(tmp_path / "img")).problems())
    for uri in ("docker://ghcr.io/x/hpcnlp:1", "library://x/y", "oras://reg/x:1"):
        assert not ClusterProfile(container="apptainer", image=uri).problems()
    assert not ClusterProfile(container="pyxis", image="nvcr.io#x/y").problems()  # not a path for pyxis


# --- 3. GPUs from Slurm but no CUDA in torch: refuse, do not train on the CPU ------------------------
def test_cuda_guard_refuses_gpus_torch_cannot_use(allocation, tmp_path):
    import torch

    from hpcnlp.config import TrainingConfig
    from hpcnlp.train import harness

    allocation.setattr(torch.cuda, "is_available", lambda: False)
    allocation.setattr(harness, "nvidia_driver", lambda: "535.104.05")
    allocation.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(ConfigError) as e:
        harness.training_arguments(TrainingConfig(), str(tmp_path / "run"))
    [line] = e.value.lines
    assert "Slurm gave this job 4 GPU(s) but torch.cuda.is_available() is False" in line
    assert f"CUDA {torch.version.cuda or 'none'}" in line and "driver 535.104.05" in line
    allocation.delenv("SLURM_GPUS_ON_NODE")
    allocation.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=0,1"):
        harness.training_arguments(TrainingConfig(), str(tmp_path / "run"))
    # No GPUs given (or outside an allocation): CPU training as before
    allocation.delenv("CUDA_VISIBLE_DEVICES")
    assert harness.training_arguments(TrainingConfig(), str(tmp_path / "run")).use_cpu
    allocation.setenv("SLURM_GPUS_ON_NODE", "4")
    allocation.delenv("SLURM_JOB_ID")
    assert harness.training_arguments(TrainingConfig(), str(tmp_path / "run")).use_cpu


def test_nvidia_driver_says_when_there_is_no_nvidia_smi(monkeypatch):
    import shutil

    from hpcnlp.train import harness

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert harness.nvidia_driver() == "no nvidia-smi"
