"""The cluster profile on a real Slurm (2 slurmd nodes on this machine): its options as Slurm records
them, `hpcnlp status` through a preempt / requeue / finish cycle, the log linked into output_dir, and
one TensorBoard curve across the requeue."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_jobs import log_of, tiny_pretrain

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
HPCNLP = [sys.executable, "-m", "hpcnlp"]


def hpcnlp(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HPCNLP, *args], cwd=cwd, env=env, capture_output=True, text=True)


def with_profile(job_env: dict, tmp: Path, **fields) -> dict:
    path = tmp / "cluster.yaml"
    path.write_text(
        yaml.safe_dump({"cpus_per_task": 1, "time": "30", "nodes": 1, "log_dir": str(tmp / "logs"), **fields})
    )
    return {**job_env, "HPCNLP_CLUSTER": str(path)}


def test_profile_options_are_what_slurm_records(slurm, job_env, tmp_path, cluster_corpus):
    env = with_profile(
        job_env,
        tmp_path,
        account="nlp",
        partition="debug",
        mem="500M",
        time="00:20:00",
        mail_user="me@example.org",
        mail_type="END,FAIL",
        env={"NCCL_DEBUG": "WARN"},
        sbatch=["--comment=from-the-profile"],
    )
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "pydocs", max_steps=2)
    res = hpcnlp(env, tmp_path, "submit", "--config", str(config), "--sbatch=--hold", "--sbatch=--time=00:25:00")
    assert res.returncode == 0, res.stderr
    job, log = re.search(r"^submit: submitted job (\d+), log (\S+)$", res.stdout, re.M).groups()
    try:
        got = slurm.job(job)
        assert got["JobName"] == "pretrain-pydocs" and got["Account"] == "nlp" and got["Partition"] == "debug"
        assert got["MinMemoryNode"] == "500M" and got["NumNodes"] in ("1", "1-1") and got["CPUs/Task"] == "1"
        assert got["TimeLimit"] == "00:25:00"  # the job's own --sbatch wins over the profile's time
        assert got["MailUser"] == "me@example.org" and got["MailType"] == "END,FAIL"
        assert got["Comment"] == "from-the-profile"
        assert got["StdOut"] == log == f"{tmp_path}/logs/pretrain-pydocs-{job}.out"
        status = json.loads((tmp_path / "pydocs" / "status.json").read_text())
        assert status["state"] == "queued" and status["log"] == log
    finally:
        slurm.run("scancel", job, check=False)


def _status(env: dict, tmp: Path, out: Path) -> dict:
    res = hpcnlp(env, tmp, "status", str(out))
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("|")]
    keys = [c.strip() for c in lines[0].strip("|").split("|")]
    return dict(zip(keys, [c.strip() for c in lines[2].strip("|").split("|")]))


def test_status_through_preempt_requeue_finish_with_one_tensorboard_curve(slurm, job_env, tmp_path, cluster_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = with_profile(job_env, tmp_path)
    config = tiny_pretrain(
        tmp_path,
        cluster_corpus,
        tmp_path / "prepared",
        "tb",
        max_steps=120,
        save_steps=40,
        logging_steps=5,
        report_to=["tensorboard"],
    )
    out = tmp_path / "tb"
    res = hpcnlp(env, tmp_path, "submit", "--config", str(config))
    assert res.returncode == 0, res.stderr
    job = re.search(r"submitted job (\d+)", res.stdout).group(1)

    deadline = time.time() + 300
    while not (row := _status(env, tmp_path, out)).get("step") and time.time() < deadline:
        time.sleep(1)
    assert row["state"] == "running" and row["slurm"] == "RUNNING" and row["job id"] == job, row
    assert re.fullmatch(r"\d+/120", row["step"]) and float(row["loss"]) > 0 and row["restarts"] == "0"

    slurm.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.time() + 180
    while int(slurm.job(job).get("Restarts", 0)) < 1 and time.time() < deadline:
        time.sleep(0.5)
    row = _status(env, tmp_path, out)
    assert row["state"] == "preempted" and row["slurm"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), row
    slurm.start_now(job)
    assert slurm.wait(job, timeout=400) == "COMPLETED", log_of(slurm, job)[-3000:]

    row = _status(env, tmp_path, out)
    log = f"{tmp_path}/logs/pretrain-tb-{job}.out"
    assert (row["state"], row["slurm"], row["step"], row["restarts"], row["log"]) == (
        "finished",
        "COMPLETED",
        "120/120",
        "1",
        log,
    ), row
    assert "requeueing job" in Path(log).read_text() and "restart 1 on" in Path(log).read_text()
    assert (out / Path(log).name).resolve() == Path(log)  # the log, linked into output_dir
    # One TensorBoard curve: every logged step once, in order, across the requeue.
    runs = out / "runs"
    assert not [p for p in runs.iterdir() if p.is_dir()]
    events = EventAccumulator(str(runs))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, 121, 5))
