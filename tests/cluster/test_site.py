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
SLURM_VARS = (
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_NTASKS_PER_NODE",
    "CUDA_VISIBLE_DEVICES",
)


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
    head = srun[: srun.index("hpcnlp.runtime.launch")]
    assert "--cpus-per-task=32" in head and "--gpus-per-node=a100:4" in head
    assert "export SRUN_CPUS_PER_TASK=32" in launch.bash_assignments(plan).splitlines()
    evaled = subprocess.run(
        ["bash", "-c", 'eval "$PLAN"; echo "$SRUN_CPUS_PER_TASK ${CMD[5]}"'],
        text=True,
        capture_output=True,
        env={**os.environ, "PLAN": launch.bash_assignments(plan)},
    ).stdout
    assert evaled.split() == ["32", "--cpus-per-task=32"]  # launch.sh evals the plan: srun sees both
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
    srun = launch_lines(
        ClusterProfile(),
        JOBS["export"],
        ["x.yaml"],
        options.sbatch_options(ClusterProfile(), JOBS["export"], "e"),
        tmp_path,
    )[0]
    assert f"--cpus-per-task={JOBS['export'].slurm.cpus_per_task}" in srun and "gpu" not in srun.split("python")[0]


# --- 2. one GPU reader: the dry run plans what the launcher starts ----------------------------------
@pytest.mark.parametrize(
    "sbatch,env,expect",
    [
        (["--gres=gpu:4"], {"SLURM_GPUS_ON_NODE": "4"}, 4),
        (["--gres=gpu:a100:4"], {"SLURM_JOB_GPUS": "0,1,2,3"}, 4),
        (["--gres=gpu:a100:2,nvme:1"], {"SLURM_GPUS_ON_NODE": "2"}, 2),
        (["--gpus-per-node=4"], {"SLURM_GPUS_PER_NODE": "4"}, 4),
        (["--gpus-per-node=h100:4"], {"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
        (["--gpus=8", "--nodes=2"], {"SLURM_GPUS": "8"}, 4),
        (["--gpus-per-task=4"], {"SLURM_GPUS_PER_TASK": "4"}, 4),
        (["--gpus-per-task=a100:2"], {"SLURM_GPUS_PER_TASK": "a100:2"}, 2),
    ],
)
def test_dry_run_and_launcher_read_the_same_gpu_count(sbatch, env, expect, allocation):
    profile = ClusterProfile(sbatch=sbatch)
    opts = options.sbatch_options(profile, JOBS["pretrain"], "p")
    assert options.processes(profile, JOBS["pretrain"], opts) == (2, expect)
    for k, v in env.items():
        allocation.setenv(k, v)
    assert launch.plan_from_env("pretrain", []).nproc_per_node == expect


# --- 4. per-job resources; post-processing jobs on CPUs -------------------------------------------
def test_post_processing_jobs_get_no_gpu_and_the_cpu_partition():
    profile = ClusterProfile(
        partition="gpu",
        cpu_partition="cpu",
        gpus_per_node=4,
        cpus_per_task=32,
        time="12:00:00",
        sbatch=["--gres=gpu:4", "--constraint=h100"],
        jobs={
            "prepare": {"cpus_per_task": 16, "mem": "64G", "time": "04:00:00"},
            "validate": {"gpus_per_node": 1, "partition": "gpu"},
        },
    )
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
    assert "jobs.export.time: is the number 43200" in lines and "quote it" in lines
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
    allocation.setenv("HPCNLP_ALLOW_CPU", "1")  # said on purpose: GRES that are no CUDA devices
    assert harness.training_arguments(TrainingConfig(), str(tmp_path / "run")).use_cpu
    allocation.delenv("HPCNLP_ALLOW_CPU")
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


# --- a user's working dir with the fake Slurm tools ---------------------------------------------------
@pytest.fixture
def workdir(tmp_path, monkeypatch, fake_slurm):
    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cpu.yaml").write_text("gpus_per_node: 0\n")
    monkeypatch.setenv("HPCNLP_CLUSTER", str(tmp_path / "cpu.yaml"))
    return tmp_path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- 5. the dry run of a multi-GPU pretrain with no prepared data prints the plan --------------------
def test_dry_run_without_prepared_data_prints_the_plan_and_names_prepare(workdir, fake_slurm, capsys):
    (workdir / "gpu.yaml").write_text("gpus_per_node: 4\npartition: gpu\n")
    os.environ["HPCNLP_CLUSTER"] = str(workdir / "gpu.yaml")
    rc, out, err = cli(capsys, "submit", "--config", "jobs/pretrain.yaml", "--dry-run")
    assert rc == 0, err
    assert "  sbatch: " in out and "--gpus-per-node=4" in out and "--nproc-per-node=4" in out
    assert "warning: jobs/pretrain.yaml: data: no prepared data at" in err
    assert "run the prepare stage first (hpcnlp submit --config jobs/prepare.yaml" in err
    rc, out, err = cli(capsys, "submit", "--config", "jobs/pretrain.yaml")  # a real submit still refuses
    assert rc == 2 and "no prepared data" in err and fake_slurm.calls("sbatch") == []


# --- 6. a run with a job queued or running is not submitted again ------------------------------------
def test_second_submission_of_a_queued_run_is_refused_unless_forced(workdir, fake_slurm, capsys):
    assert cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")[0] == 0
    fake_slurm.set_state("1001", "PENDING")
    rc, out, err = cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")
    assert rc == 2 and "already has job 1001 (PENDING) queued or running" in err and "--force" in err
    assert len(fake_slurm.calls("sbatch")) == 1
    # squeue failing: maybe alive, refused, saying so
    bad = workdir / "badbin"
    bad.mkdir()
    (bad / "squeue").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (bad / "squeue").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{bad}:{path}"
    try:
        rc, out, err = cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")
        assert rc == 2 and "squeue could not say" in err and "Unable to contact" in err
    finally:
        os.environ["PATH"] = path
    assert cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml", "--force")[0] == 0
    assert len(fake_slurm.calls("sbatch")) == 2
    # Once Slurm no longer lists it, a new submission goes through
    fake_slurm.set_state("1001", None)
    fake_slurm.set_state("1002", "COMPLETED")
    assert cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")[0] == 0


def test_pipeline_and_sweep_rerun_while_queued_are_refused(workdir, fake_slurm, capsys):
    assert cli(capsys, "pipeline", "--config", "jobs/pipeline.yaml")[0] == 0
    assert len(fake_slurm.calls("sbatch")) == 6
    fake_slurm.set_state("1002", "PENDING")  # the pretrain stage, after prepare
    rc, out, err = cli(capsys, "pipeline", "--config", "jobs/pipeline.yaml")
    assert rc == 2 and "stage 'pretrain'" in err and "1002 (PENDING)" in err and len(fake_slurm.calls("sbatch")) == 6
    sweep = [
        "sweep",
        "--config",
        "jobs/finetune-sentiment.yaml",
        "output_dir=outputs/sw",
        "--overrides-list",
        "training.seed=1",
        "training.seed=2",
    ]
    assert cli(capsys, *sweep)[0] == 0
    array = fake_slurm.calls("sbatch")[-1]
    fake_slurm.set_state("1007", "PENDING")
    rc, out, err = cli(capsys, *sweep)
    assert rc == 2 and "sweep 'outputs/sw' already has job 1007" in err
    # --force: a second manifest; the first (which the queued array reads) is untouched
    first = Path(array["env"]["HPCNLP_SWEEP"])
    before = first.read_text()
    assert cli(capsys, *sweep, "--force")[0] == 0
    second = Path(fake_slurm.calls("sbatch")[-1]["env"]["HPCNLP_SWEEP"])
    assert second != first and first.read_text() == before
    assert json.loads((workdir / "outputs" / "sw" / "sweep.json").read_text())["manifest"] == second.name


# --- 11. status: stale runs, complete prepare, queued sweep tasks --------------------------------------
def test_status_says_stale_when_the_process_and_the_job_are_gone(workdir, fake_slurm, capsys):
    import socket

    run = workdir / "outputs" / "finetune-sentiment"
    run.mkdir(parents=True)
    (run / "status.json").write_text(
        json.dumps({"state": "running", "slurm_job_ids": ["77"], "eta_seconds": 600, "step": 5, "max_steps": 100})
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run.parent / ".finetune-sentiment.lock").write_text(
        json.dumps({"slurm_job_id": "77", "pid": dead.pid, "host": socket.gethostname()})
    )
    rc, out, err = cli(capsys, "status", str(run))
    assert "stale: process gone" in out and "10m00s" not in out
    fake_slurm.set_state("77", "RUNNING")  # Slurm still runs it (on another node, say): not stale
    (run.parent / ".finetune-sentiment.lock").unlink()
    rc, out, err = cli(capsys, "status", str(run))
    assert "stale" not in out and "10m00s" in out
    fake_slurm.set_state("77", None)  # no lock, Slurm forgot it
    assert "stale: process gone" in cli(capsys, "status", str(run))[1]


def test_status_shows_a_prepared_corpus_complete_as_pipeline_skips_it(workdir, fake_slurm, capsys):
    assert cli(capsys, "prepare", "--config", "jobs/prepare.yaml")[0] == 0
    rc, out, err = cli(capsys, "status", "jobs/prepare.yaml")
    assert rc == 0 and "| prepare | complete" in out.replace("  ", " ").replace("  ", " ")
    rc, out, err = cli(capsys, "pipeline", "--config", "jobs/pipeline.yaml", "--dry-run")
    assert "prepare: complete, skipped" in out
    rc, out, err = cli(capsys, "status", "jobs/pipeline.yaml")
    row = next(line for line in out.splitlines() if line.startswith("| prepare"))
    assert [c.strip() for c in row.strip("|").split("|")][1] == "complete"


def test_sweep_tasks_show_queued_right_after_submission(workdir, fake_slurm, capsys):
    assert (
        cli(
            capsys,
            "sweep",
            "--config",
            "jobs/finetune-sentiment.yaml",
            "output_dir=outputs/sw",
            "--overrides-list",
            "training.seed=1",
            "training.seed=2",
        )[0]
        == 0
    )
    fake_slurm.set_state("1001", "PENDING")
    fake_slurm.set_state("1001_0", "PENDING")
    fake_slurm.set_state("1001_1", "PENDING")
    rc, out, err = cli(capsys, "status", "outputs/sw")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| task-")]
    assert [r[:4] for r in rows] == [
        ["task-0", "queued", "PENDING", "1001_0"],
        ["task-1", "queued", "PENDING", "1001_1"],
    ]


# --- 12. cancel and logs ----------------------------------------------------------------------------
def test_cancel_scancels_what_a_run_pipeline_or_sweep_has_queued(workdir, fake_slurm, capsys):
    assert cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")[0] == 0
    rc, out, err = cli(capsys, "cancel", "outputs/finetune-sentiment")
    assert rc == 0 and "cancelled job 1001 (finetune-sentiment)" in out
    assert fake_slurm.calls("scancel")[-1]["argv"] == ["1001"]
    st = json.loads((workdir / "outputs" / "finetune-sentiment" / "status.json").read_text())
    assert st["state"] == "cancelled"
    assert "nothing queued or running" in cli(capsys, "cancel", "jobs/finetune-sentiment.yaml")[1]
    assert len(fake_slurm.calls("scancel")) == 1
    # A sweep: the array job once (its pending tasks with it), every task marked
    assert (
        cli(
            capsys,
            "sweep",
            "--config",
            "jobs/finetune-sentiment.yaml",
            "output_dir=outputs/sw",
            "--overrides-list",
            "training.seed=1",
            "training.seed=2",
        )[0]
        == 0
    )
    rc, out, err = cli(capsys, "cancel", "outputs/sw")
    assert "cancelled job 1002 (sweep outputs/sw)" in out and fake_slurm.calls("scancel")[-1]["argv"] == ["1002"]
    for i in (0, 1):
        assert (
            json.loads((workdir / "outputs" / "sw" / f"task-{i}" / "status.json").read_text())["state"] == "cancelled"
        )
    # A pipeline: every stage's job
    assert cli(capsys, "pipeline", "--config", "jobs/pipeline.yaml")[0] == 0
    rc, out, err = cli(capsys, "cancel", "jobs/pipeline.yaml")
    assert rc == 0 and sorted(fake_slurm.calls("scancel")[-1]["argv"]) == [str(i) for i in range(1004, 1009)]
    assert "cancelled job 1008 (validate)" in out  # prepare (1003) has no status.json: shared data


def test_logs_prints_and_follows_the_recorded_slurm_log(workdir, fake_slurm, capsys):
    assert cli(capsys, "submit", "--config", "jobs/finetune-sentiment.yaml")[0] == 0
    st = json.loads((workdir / "outputs" / "finetune-sentiment" / "status.json").read_text())
    log = Path(st["log"])
    rc, out, err = cli(capsys, "logs", "outputs/finetune-sentiment")
    assert rc == 0 and "does not exist yet: job 1001 has not started" in out
    log.write_text("line 1\n")
    assert cli(capsys, "logs", "jobs/finetune-sentiment.yaml")[1] == "line 1\n"
    # -f: prints what is appended while the job runs, stops once it has ended
    fake_slurm.set_state("1001", "RUNNING")
    import threading

    def finish():
        import time

        time.sleep(0.5)
        with open(log, "a") as f:
            f.write("line 2\n")
        fake_slurm.set_state("1001", "COMPLETED")

    threading.Thread(target=finish).start()
    rc, out, err = cli(capsys, "logs", "outputs/finetune-sentiment", "-f", "--interval", "0.2")
    assert rc == 0 and out == "line 1\nline 2\n"


# --- 8. check takes a cluster profile and a pipeline ---------------------------------------------------
def test_check_takes_a_cluster_profile_and_a_pipeline(workdir, fake_slurm, capsys):
    rc, out, err = cli(capsys, "check", "--config", "jobs/cluster.yaml")
    assert rc == 0 and "is a valid cluster profile" in out and "unknown job" not in err
    (workdir / "gpu.yaml").write_text("partition: gpu\ncpu_partition: cpu\ngpus_per_node: 4\ntime: 12h\n")
    rc, out, err = cli(capsys, "check", "--config", "gpu.yaml")
    assert rc == 2 and "gpu.yaml: time: '12h' is not a Slurm time limit" in err
    (workdir / "gpu.yaml").write_text("partition: gpu\ncpu_partition: cpu\ngpus_per_node: 4\n")
    rc, out, err = cli(capsys, "check", "--config", "gpu.yaml")
    assert rc == 0 and "  export: --partition=cpu" in out and "  pretrain: --partition=gpu --gpus-per-node=4" in out
    rc, out, err = cli(capsys, "check", "--config", "jobs/pipeline.yaml")
    assert rc == 0, err
    assert "valid pipeline: prepare, pretrain, finetune, distill, export, validate" in out
    assert fake_slurm.calls("sbatch") == [] and not (workdir / "state").exists()  # nothing queued or frozen
    (workdir / "bad-pipeline.yaml").write_text(
        "stages:\n  - {config: jobs/finetune-sentiment.yaml, overrides: {training.learning_rate: -1}}\n"
    )
    rc, out, err = cli(capsys, "check", "--config", "bad-pipeline.yaml")
    assert rc == 2 and "learning_rate" in err


# --- 9. report_to names an installed integration ------------------------------------------------------
def test_report_to_without_its_package_is_refused_at_check(workdir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "sqlalchemy") else real(name, *a)
    )
    rc, out, err = cli(
        capsys, "check", "--config", "jobs/finetune-sentiment.yaml", "training.report_to=[wandb,tensorboard]"
    )
    assert rc == 2 and "training.report_to: 'wandb' is not installed here. Fix: pip install 'hpcnlp[wandb]'" in err
    assert "'tensorboard' is not installed" not in err and len(err.strip().splitlines()) == 1
    # mlflow alone (mlflow-skinny) cannot keep runs in its sqlite store: the extra brings sqlalchemy too
    rc, out, err = cli(capsys, "check", "--config", "jobs/finetune-sentiment.yaml", "training.report_to=[mlflow]")
    assert rc == 2 and "'mlflow' is not installed here. Fix: pip install 'hpcnlp[mlflow]'" in err
    for ok in ("none", "all", "tensorboard", "[none]"):
        assert cli(capsys, "check", "--config", "jobs/finetune-sentiment.yaml", f"training.report_to={ok}")[0] == 0
    rc, out, err = cli(capsys, "check", "--config", "jobs/finetune-sentiment.yaml", "training.report_to=wandbb")
    assert rc == 2 and "unknown integration 'wandbb'" in err
