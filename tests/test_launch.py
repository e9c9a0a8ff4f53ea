"""The Python half of slurm/launch.sh (runtime/launch.py), the preemption flag, and the submit-side
logic (pipeline resolution, sweep manifests, summary) without a Slurm: pure functions and real bash.
The real-Slurm runs are in tests/slurm/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from hpcnlp.runtime import launch, preempt
from hpcnlp.runtime.launch import LaunchError, Plan

REPO = Path(__file__).resolve().parents[1]

PLAN = dict(
    job="pretrain",
    job_args=["--config", "jobs/pretrain.yaml", "training.max_steps=5"],
    nnodes=2,
    nproc_per_node=4,
    master_addr="10.0.0.1",
    master_port=23456,
    python="/venv/bin/python",
    workdir="/scratch/me/hpcnlp",
)


def test_torchrun_node_command_uses_this_nodes_rank():
    cmd = launch.node_command("torchrun", 2, 4, 1, "10.0.0.1", 23456, "pretrain", ["--config", "x.yaml"], "py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert {
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=23456",
        "--max-restarts=0",
        "--shutdown-timeout=900",  # not torchrun's 30 s: a slow checkpoint after SIGTERM is not killed
    } <= set(cmd)
    assert cmd[-5:] == ["-m", "hpcnlp", "pretrain", "--config", "x.yaml"]


def test_accelerate_node_command_is_multi_process_not_cpu():
    cmd = launch.node_command("accelerate", 2, 3, 1, "h1", 29000, "finetune", ["--config", "f.yaml"], "py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    # --cpu would silently start ONE process; --multi_gpu with the total count starts them all (gloo on CPU).
    assert "--cpu" not in cmd and "--multi_gpu" in cmd
    assert {
        "--num_processes=6",
        "--num_machines=2",
        "--machine_rank=1",
        "--main_process_ip=h1",
        "--main_process_port=29000",
    } <= set(cmd)
    with pytest.raises(LaunchError, match="unknown launcher"):
        launch.node_command("deepspeed", 1, 1, 0, "h", 1, "pretrain", [], "py")


def test_srun_line_one_task_per_node_and_kill_on_bad_exit():
    cmd = launch.srun_command(Plan(**PLAN))
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd and "--ntasks-per-node=1" in cmd
    assert "--nodes=2" in cmd and "--ntasks=2" in cmd
    # The node rank is NOT expanded on the head: each node's launcher reads its own SLURM_NODEID.
    assert not any("node-rank" in c or "SLURM_NODEID" in c for c in cmd)
    i = cmd.index("hpcnlp.runtime.launch")
    assert cmd[i + 1 : i + 6] == [
        "node",
        "--launcher=torchrun",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--master=10.0.0.1:23456",
    ]
    assert cmd[-4:] == ["pretrain", "--config", "jobs/pretrain.yaml", "training.max_steps=5"]


@pytest.mark.parametrize(
    "container,expect_srun,expect_prefix",
    [
        ("none", [], []),
        (
            "apptainer",
            [],
            [
                "apptainer",
                "exec",
                "--nv",
                "--bind",
                "/scratch/me/hpcnlp,/data",
                "--pwd",
                "/scratch/me/hpcnlp",
                "img.sif",
            ],
        ),
        ("singularity", [], ["singularity", "exec", "--nv"]),
        (
            "pyxis",
            [
                "--container-image=img.sif",
                "--container-mounts=/scratch/me/hpcnlp:/scratch/me/hpcnlp,/data:/data",
                "--container-workdir=/scratch/me/hpcnlp",
            ],
            [],
        ),
        ("podman", [], ["podman", "run", "--rm", "--network=host", "--ipc=host", "--runtime", "runc"]),
    ],
)
def test_container_wrapping(container, expect_srun, expect_prefix):
    plan = Plan(**PLAN, container=container, image="img.sif", binds=["/data"], podman_args=["--runtime", "runc"])
    srun_opts, prefix = launch.container_wrap(plan)
    assert srun_opts == expect_srun
    assert prefix[: len(expect_prefix)] == expect_prefix
    full = launch.srun_command(plan)
    if container == "podman":
        assert prefix[-3:] == ["-w", "/scratch/me/hpcnlp", "img.sif"]
        assert "-v" in prefix and "/scratch/me/hpcnlp:/scratch/me/hpcnlp" in prefix and "--env=SLURM_*" in prefix
    if container != "none":  # the job itself runs inside the image, after the wrapper
        assert full.index("hpcnlp.runtime.launch") > len(srun_opts)
    check = launch.check_command(plan)
    assert check[check.index("check") + 1 :] == PLAN["job_args"]
    if container == "pyxis":  # pyxis exists only inside srun
        assert check[0] == "srun" and "--ntasks=1" in check


def test_podman_passes_the_sites_network_settings_and_ib_devices(monkeypatch, tmp_path):
    """NCCL/UCX/libfabric settings a site tunes reach the job, and /dev/infiniband when the node has it:
    without them NCCL inside podman falls back to TCP sockets."""
    plan = Plan(**PLAN, container="podman", image="img")
    _, prefix = launch.container_wrap(plan)
    assert {"--env=NCCL_*", "--env=UCX_*", "--env=FI_*"} <= set(prefix)
    assert "/dev/infiniband" not in prefix
    _, prefix = launch.container_wrap(Plan(**PLAN, container="podman", image="img", ib_devices=True))
    assert prefix[prefix.index("/dev/infiniband") - 1] == "--device"

    monkeypatch.setattr(launch, "_scontrol", lambda *a: "NodeAddr=10.0.0.1" if a[:2] == ("show", "node") else "n1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setattr(launch, "IB_DEVICES", str(tmp_path / "infiniband"))
    assert launch.plan_from_env("pretrain", []).ib_devices is False
    (tmp_path / "infiniband").mkdir()
    assert launch.plan_from_env("pretrain", []).ib_devices is True


def test_container_needs_an_image():
    with pytest.raises(LaunchError, match="HPCNLP_IMAGE"):
        launch.container_wrap(Plan(**PLAN, container="apptainer"))
    with pytest.raises(LaunchError, match="unknown container"):
        launch.container_wrap(Plan(**PLAN, container="docker", image="x"))


def test_job_port_is_stable_and_skips_busy_ports():
    assert launch.job_port(12345, is_free=lambda p: True) == launch.job_port(12345, is_free=lambda p: True)
    first = launch.job_port(12345, is_free=lambda p: True)
    assert launch.PORT_BASE <= first < launch.PORT_BASE + launch.PORT_SPAN
    assert launch.job_port(12345, is_free=lambda p: p != first) == first + 1
    with pytest.raises(LaunchError, match="no free port"):
        launch.job_port(1, is_free=lambda p: False)


def test_plan_refuses_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(LaunchError, match="not inside a Slurm allocation"):
        launch.plan_from_env("pretrain", [])


def test_single_process_jobs_ignore_the_gpu_count(monkeypatch, tmp_path):
    """export/validate/prepare on a 4-GPU node: one process (four would race on one output_dir); on two
    nodes `hpcnlp check` refuses them before anything starts."""
    from hpcnlp.cluster import launcher
    from hpcnlp.jobs import JOBS

    assert {job for job, spec in JOBS.items() if spec.single_process} == {"prepare", "export", "validate"}
    seen = {}
    monkeypatch.setattr(launch, "main", lambda argv, single_process: seen.setdefault(argv[1], single_process))
    for job in JOBS:  # slurm/launch.sh's planner entry tells the planner what the spec says
        launcher.main(["plan", job, "--config", "x.yaml"])
    assert {job for job, single in seen.items() if single} == {"prepare", "export", "validate"}
    monkeypatch.undo()
    assert launch.node_processes(False, 4) == 4 and launch.node_processes(True, 4) == 1
    monkeypatch.setattr(
        launch, "_scontrol", lambda *a: "NodeAddr=10.0.0.1" if a[0] == "show" and a[1] == "node" else "n1 n2"
    )
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert launch.plan_from_env("finetune", []).nproc_per_node == 4
    assert launch.plan_from_env("export", [], single_process=True).nproc_per_node == 1
    from hpcnlp.config import ConfigError
    from hpcnlp.jobs import load_config

    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    with pytest.raises(ConfigError, match="--nodes=1"):
        load_config(REPO / "jobs" / "prepare.yaml")
    load_config(REPO / "jobs" / "pretrain.yaml", check=False)  # data-parallel jobs take any node count


def test_bash_assignments_survive_eval_by_real_bash():
    """launch.sh evals the plan: arguments with spaces and quotes must come back intact."""
    plan = Plan(**{**PLAN, "job_args": ["--config", "my jobs/it's.yaml", "data.text_field=a b"]})
    script = launch.bash_assignments(plan) + 'printf "%s\\n" "${CMD[@]}"; echo ---; printf "%s\\n" "${CHECK[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    cmd, check = out.split("---\n")
    assert cmd.splitlines() == launch.srun_command(plan)
    assert check.splitlines() == launch.check_command(plan)


def test_sweep_task_args(tmp_path):
    manifest = tmp_path / "sweep.json"
    manifest.write_text(
        json.dumps({"tasks": [["training.seed=1", "output_dir=o/task-0"], ["training.seed=2", "output_dir=o/task-1"]]})
    )
    assert launch.sweep_task_args(str(manifest), 1) == ["training.seed=2", "output_dir=o/task-1"]
    assert launch.sweep_task_args(None, None) == []
    with pytest.raises(LaunchError, match="no task 2"):
        launch.sweep_task_args(str(manifest), 2)


def test_launch_sh_is_thin_and_valid_bash():
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "-n", str(repo / "slurm" / "launch.sh")], check=True)
    from hpcnlp.jobs import JOBS

    for job, spec in JOBS.items():
        text = (repo / "slurm" / f"{job}.sbatch").read_text()
        requeues = "#SBATCH --requeue" in text and "--signal=B:USR1@" in text and "--open-mode=append" in text
        assert requeues == spec.resumable and ("#SBATCH --no-requeue" in text) != spec.resumable, job
        assert f'slurm/launch.sh" {job} "$@"' in text
        subprocess.run(["bash", "-n", str(repo / "slurm" / f"{job}.sbatch")], check=True)
    for name in ("zero1", "zero2", "zero3", "zero3-offload"):
        ds = json.loads((repo / "jobs" / "deepspeed" / f"{name}.json").read_text())
        assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_preemption_flag_file_from_the_launcher_stops_training(tmp_path, monkeypatch):
    """What launch.sh does on USR1 (touch $HPCNLP_PREEMPT_FILE) makes the next step save and stop."""
    flag = tmp_path / "preempt-123"
    monkeypatch.setenv("HPCNLP_PREEMPT_FILE", str(flag))
    cb = preempt.PreemptionCallback(str(tmp_path / "out"))
    args = types.SimpleNamespace(device="cpu")
    state = types.SimpleNamespace(global_step=7, is_world_process_zero=True)
    control = types.SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(args, state, control)
    assert not control.should_training_stop and not cb.requested
    flag.touch()
    cb.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and cb.requested


# --- submit side: pipeline resolution, local run, summary ------------------------------------
def _write(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


@pytest.fixture
def scratch_config(tmp_path, small_corpus):
    return _write(
        tmp_path / "scratch.yaml",
        {
            "job": "pretrain",
            "init": "scratch",
            "output_dir": str(tmp_path / "scratch"),
            "scratch": {
                "vocab_size": 500,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            },
            "data": {
                "train_files": [str(small_corpus / "*.rst.txt")],
                "max_seq_length": 32,
                "eval_fraction": 0.05,
                "prepared_root": str(tmp_path / "prepared"),
            },
            "training": {
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "eval_strategy": "no",
                "save_steps": 2,
                "seed": 3,
            },
        },
    )


def test_pipeline_references_resolve_and_pending_outputs_pass_the_check(tmp_path, scratch_config):
    from hpcnlp.cluster.pipeline import load_pipeline

    path = _write(
        tmp_path / "pipe.yaml",
        {
            "stages": [
                {"name": "first", "config": str(scratch_config)},
                {
                    "name": "second",
                    "config": str(scratch_config),
                    "overrides": {
                        "init": "pretrained",
                        "model_name_or_path": "${first.output_dir}",
                        "output_dir": "${first.output_dir}-2",
                        "training.max_steps": 1,
                    },
                },
            ]
        },
    )
    stages = load_pipeline(str(path))
    assert [s.name for s in stages] == ["first", "second"] and not any(s.skip for s in stages)
    assert f"model_name_or_path={tmp_path}/scratch" in stages[1].overrides
    assert stages[1].cfg.output_dir == f"{tmp_path}/scratch-2" and stages[1].cfg.training.max_steps == 1


def test_pipeline_refuses_unknown_stage_reference_naming_file_and_key(tmp_path, scratch_config):
    from hpcnlp.cluster.pipeline import load_pipeline
    from hpcnlp.config import ConfigError

    path = _write(
        tmp_path / "pipe.yaml",
        {
            "stages": [
                {
                    "name": "second",
                    "config": str(scratch_config),
                    "overrides": {"model_name_or_path": "${first.output_dir}"},
                }
            ]
        },
    )
    with pytest.raises(ConfigError) as e:
        load_pipeline(str(path))
    assert (
        "pipe.yaml: stages[0].overrides.model_name_or_path: '${first.output_dir}' names no earlier stage"
        in e.value.lines[0]
    )


def test_submit_refuses_bad_config_before_sbatch(tmp_path, scratch_config):
    """Exit 2 and an error naming file and key; sbatch is never reached (none is installed here)."""
    res = subprocess.run(
        [sys.executable, "-m", "hpcnlp", "submit", "--config", str(scratch_config), "training.learning_rat=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "training.learning_rat: unknown key. Fix: did you mean 'learning_rate'?" in res.stderr
    assert "nothing was queued" in res.stderr


@pytest.mark.slow
def test_pipeline_local_runs_stages_in_order_then_skips_them(tmp_path, scratch_config, monkeypatch, capsys):
    from hpcnlp.cluster.pipeline import run_pipeline

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = _write(
        tmp_path / "pipe.yaml",
        {
            "stages": [
                {"name": "first", "config": str(scratch_config)},
                {
                    "name": "second",
                    "config": str(scratch_config),
                    "overrides": {
                        "init": "pretrained",
                        "model_name_or_path": "${first.output_dir}",
                        "output_dir": str(tmp_path / "second"),
                        "training.max_steps": 1,
                    },
                },
            ]
        },
    )
    assert run_pipeline(str(path), local=True) == 0
    first = json.loads((tmp_path / "scratch" / "metrics.json").read_text())
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert first["global_step"] == 2 and second["global_step"] == 1
    capsys.readouterr()
    assert run_pipeline(str(path), local=True) == 0
    out = capsys.readouterr().out
    assert "first: complete" in out and "second: complete" in out and "running" not in out
    rows = [line for line in out.splitlines() if line.startswith(("| first |", "| second |"))]  # the stage table
    assert len(rows) == 2 and all("perplexity" in r and " MB |" in r for r in rows), out


def test_summary_table_lists_every_run(tmp_path):
    from hpcnlp.cluster.summary import summary

    for i, loss in enumerate([2.5, 2.25, 3.0]):
        d = tmp_path / "sweep" / f"task-{i}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(
            json.dumps(
                {"global_step": 4, "eval_after": {"loss": loss}, "job": "pretrain", "only_here": i if i else None}
            )
        )
    table = summary([str(tmp_path / "sweep")])
    lines = table.splitlines()
    assert lines[0] == "| run | global_step | eval_after.loss |"  # shared numeric keys only, flattened
    assert len(lines) == 5 and "task-2 | 4 | 3 |" in lines[4]
    assert summary([str(tmp_path / "sweep" / "task-*")]) == table
    # With the sweep's manifest, each task's row says which grid point it is.
    (tmp_path / "sweep" / "sweep.json").write_text(
        json.dumps(
            {
                "tasks": [
                    [f"training.learning_rate={lr}", f"output_dir={tmp_path}/sweep/task-{i}"]
                    for i, lr in enumerate([1, 2, 3])
                ]
            }
        )
    )
    lines = summary([str(tmp_path / "sweep")]).splitlines()
    assert lines[0] == "| run | overrides | global_step | eval_after.loss |"
    assert lines[4].endswith("task-2 | training.learning_rate=3 | 4 | 3 |")


def test_a_failing_scontrol_is_a_launch_failure_not_a_refused_config(tmp_path):
    """slurm/launch.sh with an scontrol that fails: exit 5 (launch failed) and Slurm's words, never exit 2
    "config refused" (which sends users to a config that is fine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'slurm_load_node error: Unable to contact slurm controller' >&2\nexit 1\n")
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "HPCNLP_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "launch.sh"), "finetune", str(tmp_path / "c.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == launch.EXIT_LAUNCH == 5, proc.stderr
    assert "`scontrol show hostnames n[1-2]` failed (exit 1): slurm_load_node error" in proc.stderr, proc.stderr
    assert "config refused" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
