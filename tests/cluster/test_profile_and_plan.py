"""The cluster profile (jobs/cluster.yaml) without a Slurm: rendered into sbatch options and launcher
variables, refused when it cannot work, dry runs that print what would be run, `hpcnlp status` from
status.json, the job log linked into output_dir. The real-Slurm side is tests/slurm/test_profile.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cli

from hpcnlp.cluster import options
from hpcnlp.cluster.profile import ClusterProfile, load_profile
from hpcnlp.config import ConfigError
from hpcnlp.jobs import JOBS
from hpcnlp.runtime import launch, status

REPO = Path(__file__).resolve().parents[2]
GPU_PROFILE = {
    "account": "nlp",
    "partition": "gpu",
    "qos": "high",
    "nodes": 2,
    "gpus_per_node": 4,
    "cpus_per_task": 32,
    "mem": "256G",
    "time": "12:00:00",
    "mail_user": "me@example.org",
    "mail_type": "END,FAIL",
    "container": "apptainer",
    "image": "/shared/hpcnlp.sif",
    "binds": ["/scratch", "/data"],
    "env": {"NCCL_DEBUG": "WARN"},
    "modules": ["cuda/13.0"],
    "log_dir": "/logs",
    "sbatch": ["--constraint=h100"],
}


def hpcnlp(*args: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    return cli(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1", **env})


def hpcnlp_process(*args: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    """A fresh process: for a job registry that differs from this one's ($HPCNLP_JOB_PACKAGES)."""
    return subprocess.run(
        [sys.executable, "-m", "hpcnlp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def test_profile_renders_every_field_and_per_job_options_win():
    profile = ClusterProfile(**GPU_PROFILE)
    opts = options.sbatch_options(profile, JOBS["pretrain"], "pretrain-pydocs", extra=["--time=1:00:00"])
    assert opts == [
        "--job-name=pretrain-pydocs",
        "--account=nlp",
        "--partition=gpu",
        "--qos=high",
        "--nodes=2",
        "--gpus-per-node=4",
        "--cpus-per-task=32",
        "--mem=256G",
        "--mail-user=me@example.org",
        "--mail-type=END,FAIL",
        "--output=/logs/%x-%j.out",
        "--constraint=h100",
        "--time=1:00:00",
    ]
    # Single-process jobs: one node (their header), no GPU unless the profile's jobs: section asks;
    # arrays: one log per task.
    single = options.sbatch_options(profile, JOBS["export"], "export-x", array=True)
    assert not any(o.startswith(("--nodes", "--gpus")) for o in single)
    assert "--output=/logs/%x-%A_%a.out" in single
    # Any array job, e.g. a sharded prepare submitted with --sbatch=--array=0-3
    prep = options.sbatch_options(profile, JOBS["prepare"], "prepare", extra=["--array=0-3"])
    assert "--output=/logs/%x-%A_%a.out" in prep and prep[-1] == "--array=0-3"
    assert options.launch_env(profile) == {
        "HPCNLP_CONTAINER": "apptainer",
        "HPCNLP_IMAGE": "/shared/hpcnlp.sif",
        "HPCNLP_BIND": "/scratch,/data",
        "HPCNLP_MODULES": "cuda/13.0",
        "HPCNLP_PASS_ENV": "NCCL_DEBUG",
        "NCCL_DEBUG": "WARN",
    }
    # No profile: job name and log path still, nothing else.
    assert options.sbatch_options(ClusterProfile(), JOBS["pretrain"], "p") == [
        "--job-name=p",
        f"--output={Path('outputs/logs').absolute()}/%x-%j.out",
    ]


def test_job_names_say_which_run():
    from hpcnlp.jobs import load_config

    names = {
        c: options.job_name(load_config(REPO / "jobs" / c, check=False))
        for c in ("pretrain.yaml", "finetune-sentiment.yaml", "export.yaml", "prepare.yaml")
    }
    assert names == {
        "pretrain.yaml": "pretrain-pydocs",
        "finetune-sentiment.yaml": "finetune-sentiment",
        "export.yaml": "export-onnx-sentiment",
        "prepare.yaml": "prepare",
    }


def test_bad_profiles_are_refused_with_file_field_and_fix(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump({"partiton": "gpu", "gpus_per_node": 2, "nproc_per_node": 4, "container": "apptainer"})
    )
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert e.value.lines == [f"{path}: partiton: unknown key. Fix: did you mean 'partition'?"]
    path.write_text(yaml.safe_dump({"gpus_per_node": 2, "nproc_per_node": 4, "container": "apptainer"}))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert [p.key for p in e.value.problems] == ["image", "nproc_per_node"]
    assert "4 processes per node but only 2 GPUs" in str(e.value)


def test_check_refuses_fp16_on_a_cpu_only_profile(tmp_path):
    cpu, gpu = tmp_path / "cpu.yaml", tmp_path / "gpu.yaml"
    cpu.write_text("gpus_per_node: 0\n")
    gpu.write_text("gpus_per_node: 2\n")
    args = ["check", "--config", "jobs/finetune-sentiment.yaml", "training.fp16=true"]
    res = hpcnlp(*args, HPCNLP_CLUSTER=str(cpu))
    assert res.returncode == 2
    assert "training.fp16: is on, but the job gets no GPU" in res.stderr and str(cpu) in res.stderr
    assert hpcnlp(*args, HPCNLP_CLUSTER=str(gpu)).returncode == 0
    # bf16 runs on CPUs (autocast): allowed, with a line on what auto would pick on this machine
    res = hpcnlp("check", "--config", "jobs/finetune-sentiment.yaml", "training.bf16=true", HPCNLP_CLUSTER=str(cpu))
    assert res.returncode == 0, res.stderr
    # submit sees the GPUs the final options ask for, the job's own --sbatch included
    res = hpcnlp(
        "submit", "--dry-run", "--config", "jobs/finetune-sentiment.yaml", "training.fp16=true", HPCNLP_CLUSTER=str(cpu)
    )
    assert res.returncode == 2 and "nothing was queued" in res.stderr
    res = hpcnlp(
        "submit",
        "--dry-run",
        "--sbatch=--gpus-per-node=1",
        "--config",
        "jobs/finetune-sentiment.yaml",
        "training.fp16=true",
        HPCNLP_CLUSTER=str(cpu),
    )
    assert res.returncode == 0, res.stderr


def test_multi_node_pretrain_without_prepared_data_is_refused_before_queueing(tmp_path):
    # A process group never tokenizes (its ranks would wait on one rank's hours under the collective
    # timeout): submit refuses it before it waits in the queue; one process prepares for itself; a
    # pipeline whose earlier stage prepares the data queues it (the six-stage dry run below). The dry
    # run prints the whole plan, with a warning naming the prepare stage.
    args = ("submit", "--config", "jobs/pretrain.yaml", f"data.prepared_root={tmp_path}/prepared")
    env = {"HPCNLP_STATE_DIR": str(tmp_path / "state"), "PATH": f"{tmp_path}/nobin:/usr/bin:/bin"}
    res = hpcnlp(*args, **env)
    assert res.returncode == 2 and "nothing was queued" in res.stderr, res.stderr
    assert "data: no prepared data at" in res.stderr and "2-process run does not tokenize" in res.stderr
    assert "hpcnlp prepare" in res.stderr
    res = hpcnlp(args[0], "--dry-run", *args[1:], **env)
    assert res.returncode == 0 and "  sbatch: " in res.stdout, res.stderr
    assert "warning: jobs/pretrain.yaml: data: no prepared data at" in res.stderr and "prepare stage" in res.stderr
    res = hpcnlp(args[0], "--dry-run", "--sbatch=--nodes=1", *args[1:], **env)
    assert res.returncode == 0 and "warning" not in res.stderr.replace("WARNING hpcnlp.checks", ""), res.stderr


def test_dry_run_of_the_six_stage_pipeline_prints_every_command(tmp_path, monkeypatch):
    # Hermetic: run from a working dir in tmp with the checkout's jobs/ and data/ linked in, so the stages'
    # relative outputs (outputs/prepared, outputs/pipeline/...) are tmp's, never the checkout's (after
    # `make demo` its outputs/prepared made the prepare stage "complete, skipped").
    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "cluster.yaml"
    (tmp_path / "hpcnlp.sif").write_text("")  # apptainer's image must be a file
    profile.write_text(
        yaml.safe_dump({**GPU_PROFILE, "log_dir": str(tmp_path / "logs"), "image": str(tmp_path / "hpcnlp.sif")})
    )
    state = tmp_path / "state"
    res = hpcnlp(
        "pipeline",
        "--config",
        "jobs/pipeline.yaml",
        "--dry-run",
        cwd=tmp_path,
        HPCNLP_CLUSTER=str(profile),
        HPCNLP_STATE_DIR=str(state),
        HPCNLP_HOME=str(REPO),
        PATH=f"{tmp_path}/nobin:/usr/bin:/bin",
    )  # no sbatch on PATH
    assert res.returncode == 0, res.stderr
    blocks = re.findall(
        r"^(\w+): would submit (\w+) .*\n  sbatch: (.*)\n  srun:   (.*)\n  node:   (.*)\n  log:    (.*)$",
        res.stdout,
        re.M,
    )
    assert [b[0] for b in blocks] == ["prepare", "pretrain", "finetune", "distill", "export", "validate"], res.stdout
    for i, (_stage, job, sbatch, srun, node, log) in enumerate(blocks):
        argv = shlex.split(sbatch)
        assert "HPCNLP_CONTAINER=apptainer" in argv and "NCCL_DEBUG=WARN" in argv
        assert argv[argv.index("sbatch") :][:2] == ["sbatch", "--parsable"]
        assert {"--account=nlp", "--partition=gpu", "--mem=256G", "--constraint=h100"} <= set(argv)
        assert argv[-2] == str(REPO / "slurm" / f"{job}.sbatch")
        assert (f"--dependency=afterok:<{blocks[i - 1][0]}>" in argv) == (i > 0)
        assert srun.startswith("srun --kill-on-bad-exit=1") and "apptainer exec --nv --bind" in srun
        assert "/scratch,/data" in srun and "/hpcnlp.sif python3 -m hpcnlp.runtime.launch node" in srun
        assert node.startswith("python3 -m torch.distributed.run") and f"-m hpcnlp {job} --config" in node
        name = re.search(r"--job-name=(\S+)", sbatch).group(1)
        assert log == f"{tmp_path}/logs/{name}-%j.out"
        single = JOBS[job].single_process
        assert ("--nproc-per-node=1" if single else "--nproc-per-node=4") in node
        assert (not any(a.startswith("--gpus") for a in argv)) if single else "--gpus-per-node=4" in argv, (job, argv)
    assert "--nodes=2" in blocks[1][2] and "--nnodes=2" in blocks[1][4]  # the stage's own option
    assert not state.exists() and not (tmp_path / "logs").exists()  # nothing frozen, nothing queued
    assert not (tmp_path / "outputs").exists()  # a dry run prepares nothing either


def test_podman_passes_gpus_and_the_nccl_torch_environment():
    plan = launch.Plan(
        job="pretrain",
        job_args=["--config", "c.yaml"],
        nnodes=1,
        nproc_per_node=2,
        master_addr="h",
        master_port=1,
        container="podman",
        image="hpcnlp:gpu",
        gpus=2,
        pass_env=["MY_PROXY_SETTING"],
    )
    _, prefix = launch.container_wrap(plan)
    assert prefix[prefix.index("--device") + 1] == "nvidia.com/gpu=all"
    assert {"--env=NCCL_*", "--env=TORCH_*", "--env=https_proxy", "--env=MY_PROXY_SETTING"} <= set(prefix)
    plan.gpus = 0
    assert "--device" not in launch.container_wrap(plan)[1]


def test_status_table_reads_status_json(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "status.json").write_text(
        json.dumps(
            {
                "state": "running",
                "job": "pretrain",
                "step": 40,
                "max_steps": 120,
                "loss": 6.54321,
                "eta_seconds": 95,
                "restarts": 1,
                "slurm_job_ids": ["7"],
                "queued_job_id": "7",
                "log": "/logs/pretrain-run-7.out",
            }
        )
    )
    res = hpcnlp("status", str(out), PATH="/usr/bin:/bin")
    assert res.returncode == 0, res.stderr
    row = [line for line in res.stdout.splitlines() if line.startswith("| run")][0]
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "run",
        "running",
        "7",
        "40/120",
        "6.5432",
        "1m35s",
        "1",
        "/logs/pretrain-run-7.out",
    ]
    res = hpcnlp("status", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "no status.json there" in res.stderr and "nothing was queued" not in res.stderr


def test_the_log_is_linked_beside_status_json(tmp_path):
    log = tmp_path / "logs" / "pretrain-x-7.out"
    log.parent.mkdir()
    log.write_text("launch: ...\n")
    out = tmp_path / "x"
    out.mkdir()
    status.link_log(str(log), out)
    status.link_log(str(log), out)  # a requeue links it again: same link
    assert (out / log.name).is_symlink() and (out / log.name).read_text() == "launch: ...\n"
    (out / "other-7.out").write_text("mine")
    status.link_log(str(tmp_path / "logs" / "missing.out"), out)  # no log: nothing
    assert sorted(p.name for p in out.iterdir()) == ["other-7.out", "pretrain-x-7.out"]


def test_status_of_a_pipeline_has_a_row_per_stage_and_sweep_dry_run_logs_per_task(tmp_path):
    res = hpcnlp("status", "jobs/pipeline.yaml", PATH="/usr/bin:/bin")
    assert res.returncode == 0, res.stderr
    rows = [line.split("|")[1:3] for line in res.stdout.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["prepare", "pretrain", "finetune", "distill", "export", "validate"]
    res = hpcnlp(
        "sweep",
        "--dry-run",
        "--config",
        "jobs/finetune-sentiment.yaml",
        f"output_dir={tmp_path}/sw",
        "--overrides-list",
        "training.learning_rate=1e-4",
        "training.learning_rate=3e-4",
        HPCNLP_CLUSTER=str(REPO / "jobs" / "cluster.yaml"),
    )
    assert res.returncode == 0, res.stderr
    sbatch = re.search(r"^  sbatch: (.*)$", res.stdout, re.M).group(1)
    assert re.search(rf"HPCNLP_SWEEP={tmp_path}/sw/sweep-[\d-]+-\w{{6}}\.json ", sbatch) and "--array=0-1" in sbatch
    assert re.search(r"^  log:    .*/outputs/logs/finetune-sw-%A_%a.out$", res.stdout, re.M), res.stdout
    assert not (tmp_path / "sw").exists()  # a dry run writes no manifest


def test_the_check_inside_a_job_leaves_gpus_to_the_allocation(tmp_path):
    """slurm/launch.sh runs `hpcnlp check` in the job: submit already checked the final options."""
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("gpus_per_node: 0\n")
    res = hpcnlp(
        "check",
        "--config",
        "jobs/finetune-sentiment.yaml",
        "training.fp16=true",
        HPCNLP_CLUSTER=str(cpu),
        SLURM_JOB_ID="7",
    )
    assert res.returncode == 0, res.stderr


def test_a_site_job_without_a_batch_script_gets_its_template_rendered_at_submit(tmp_path):
    """A job from $HPCNLP_JOB_PACKAGES has no slurm/<job>.sbatch: submit renders its template into the
    state dir (the dry run names it and writes nothing) and sbatches that."""
    pkg = tmp_path / "site" / "sitejobs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "hello.py").write_text(
        "from hpcnlp.config import JobConfig\nfrom hpcnlp.spec import JobSpec\n\n\n"
        "class HelloConfig(JobConfig):\n    job: str = 'hello'\n\n\n"
        "SPEC = JobSpec(name='hello', help='say hello', config=HelloConfig, check=lambda cfg, pending: [],\n"
        "               run=lambda cfg: 0, single_process=True)\n"
    )
    config = tmp_path / "hello.yaml"
    config.write_text(f"job: hello\noutput_dir: {tmp_path}/out\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/sbatch-args\necho 42\n')
    (bin_dir / "sbatch").chmod(0o755)
    state = tmp_path / "state"
    env = {
        "HPCNLP_JOB_PACKAGES": "sitejobs",
        "HPCNLP_STATE_DIR": str(state),
        "HPCNLP_CLUSTER": "",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
    }
    script = state / "templates" / "hello.sbatch"
    res = hpcnlp_process("submit", "--dry-run", "--config", str(config), cwd=tmp_path, **env)
    assert res.returncode == 0, res.stderr
    assert f" {script} {state}/configs/hello-" in res.stdout and not script.exists()
    res = hpcnlp_process("submit", "--config", str(config), cwd=tmp_path, **env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("submit: submitted job 42, log ")
    args = (tmp_path / "sbatch-args").read_text().splitlines()
    assert args[-2] == str(script) and args[-1].startswith(f"{state}/configs/hello-")
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n# hpcnlp hello: say hello.")
    assert text.endswith('slurm/launch.sh" hello "$@"\n')
