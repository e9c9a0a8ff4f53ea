"""End-to-end on a real Slurm (2 slurmd nodes on this machine): templates, launcher, preemption and
requeue, rank failure, pipelines, arrays, refusal at submit. No mocks.

Each training job is a 2-layer BERT from scratch on two doc files (see conftest.tiny_pretrain);
most of the time goes into Python start-up on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_jobs import REPO, log_of, tiny_pretrain

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

HPCNLP = [sys.executable, "-m", "hpcnlp"]
SBATCH_SMALL = ["--cpus-per-task=1", "--time=30"]  # USR1 warning at 25 min: never in a test
# Long enough to be signalled mid-training (~0.1 s/step), checkpoints every 40 steps.
LONG = {"max_steps": 120, "save_steps": 40, "logging_steps": 5}
# Measured on CPU, 2 processes (gloo), preempted twice: losses and final eval loss equal to the
# uninterrupted run's to all printed digits (same data order, RNG streams and masks after a resume).
LOSS_TOLERANCE = 1e-4


def sbatch_pretrain(slurm, env, tmp: Path, config: Path, *opts: str) -> str:
    return slurm.sbatch(
        [*SBATCH_SMALL, f"--output={tmp}/%x-%j.out", *opts, str(REPO / "slurm" / "pretrain.sbatch"), str(config)],
        cwd=tmp,
        env=env,
    )


def wait_for_log(slurm, job_id: str, pattern: str, after: str = "", timeout: float = 240) -> re.Match:
    """Wait until the job log, from the last line containing `after` on, matches `pattern`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_of(slurm, job_id)
        if after in text:
            m = re.search(pattern, text[text.rindex(after) :] if after else text, re.M)
            if m:
                return m
        if slurm.state(job_id) in ("FAILED", "CANCELLED", "COMPLETED"):
            break
        time.sleep(0.3)
    raise AssertionError(
        f"job {job_id} ({slurm.state(job_id)}): no /{pattern}/ in log:\n{log_of(slurm, job_id)[-3000:]}"
    )


def logged_losses(output_dir: Path, step: int) -> dict[int, float]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def reference(slurm, job_env, tmp_path_factory, cluster_corpus):
    """One uninterrupted 2-node x 1-process run (torchrun, gloo): the baseline later tests compare to."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_pretrain(tmp, cluster_corpus, tmp / "prepared", "ref", **LONG)
    job = sbatch_pretrain(slurm, job_env, tmp, config, "--nodes=2")
    state = slurm.wait(job, timeout=400)
    return {"job": job, "state": state, "log": log_of(slurm, job), "out": tmp / "ref"}


def test_two_nodes_torchrun(reference):
    assert reference["state"] == "COMPLETED", reference["log"][-3000:]
    log = reference["log"]
    assert "launch: node 0 of 2" in log and "launch: node 1 of 2" in log
    assert "[rank 0] INFO hpcnlp.runtime.preempt: rank 0 of 2 ready" in log
    assert "[rank 1] INFO hpcnlp.runtime.preempt: rank 1 of 2 ready" in log
    # Shared outputs are written once, by rank 0.
    assert log.count("model, metrics.json and report.md in") == 1
    assert "[rank 0] INFO hpcnlp.jobs.pretrain: perplexity" in log
    metrics = json.loads((reference["out"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == LONG["max_steps"]
    assert metrics["slurm_job_id"] == reference["job"]
    assert (reference["out"] / "model.safetensors").is_file()


def test_preempted_twice_resumes_with_same_steps_and_loss(slurm, job_env, tmp_path, cluster_corpus, reference):
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "pre", **LONG)
    job = sbatch_pretrain(slurm, job_env, tmp_path, config, "--nodes=2")
    for restart in (0, 1):
        # Mid-training: at least one more optimizer step logged since this (re)start.
        wait_for_log(slurm, job, r"hpcnlp\.train: step \d+/", after=f"restart {restart} on")
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        deadline = time.time() + 180
        while int(slurm.job(job).get("Restarts", 0)) <= restart and time.time() < deadline:
            time.sleep(0.5)
        assert int(slurm.job(job).get("Restarts", 0)) == restart + 1, log_of(slurm, job)[-3000:]
        slurm.start_now(job)  # skip the requeue delay
    assert slurm.wait(job, timeout=400) == "COMPLETED", log_of(slurm, job)[-3000:]

    log = log_of(slurm, job)
    assert log.count("USR1: asking every rank to checkpoint") == 2
    assert len(re.findall(r"\[rank 0\] WARNING hpcnlp\.\S+: checkpointed at step \d+", log)) == 2
    assert log.count("requeueing job") == 2 and "restart 2 on" in log
    resumed = [
        int(s) for s in re.findall(r"\[rank 0\] INFO hpcnlp.runtime.preempt: rank 0 of 2 ready at step (\d+)", log)
    ]
    assert resumed[0] == 0 and 0 < resumed[1] < resumed[2] < LONG["max_steps"]

    out, ref = tmp_path / "pre", reference["out"]
    got, want = json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text())
    assert got["global_step"] == want["global_step"] == LONG["max_steps"]  # none lost, none repeated
    losses, ref_losses = logged_losses(out, LONG["max_steps"]), logged_losses(ref, LONG["max_steps"])
    assert sorted(losses) == sorted(ref_losses)
    # The first logged loss after a resume averages fewer steps (the interval restarts there): skip it.
    short = {min(s for s in losses if s > r) for r in resumed[1:]}
    worst = max(abs(losses[s] - ref_losses[s]) for s in losses if s not in short)
    diff = abs(got["eval_after"]["loss"] - want["eval_after"]["loss"])
    print(
        f"preempted at steps {resumed[1:]}: final eval loss {got['eval_after']['loss']:.6f} vs uninterrupted "
        f"{want['eval_after']['loss']:.6f}; max logged-loss diff {worst:.2e} over {len(losses) - len(short)} steps"
    )
    assert diff < LOSS_TOLERANCE and worst < LOSS_TOLERANCE
    assert got["eval_after"]["loss"] < got["eval_before"]["loss"] - 0.2  # and it did learn


def _pids_of_rank(slurm, job_id: str, rank: int) -> list[int]:
    """Training processes (not launchers) of this cluster's job with a given RANK, found through /proc."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(
                kv.split("=", 1)
                for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (
            environ.get("SLURM_JOB_ID") == job_id
            and environ.get("SLURM_CONF") == slurm.env["SLURM_CONF"]
            and environ.get("RANK") == str(rank)
            and "-m hpcnlp pretrain" in cmdline
            and "torch.distributed.run" not in cmdline
        ):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_fails_the_whole_step(slurm, job_env, tmp_path, cluster_corpus):
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "kill", max_steps=100000, save_steps=100000)
    job = sbatch_pretrain(slurm, job_env, tmp_path, config, "--nodes=2")
    wait_for_log(slurm, job, r"hpcnlp\.train: step \d+/")
    pids = _pids_of_rank(slurm, job, 1)
    assert pids, "rank 1 not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert slurm.wait(job, timeout=120) == "FAILED"  # no hang: rank 0 is torn down too
    log = log_of(slurm, job)
    assert re.search(r"rank\s*:\s*1 \(local_rank: 0\)", log), log[-3000:]
    assert "SIGKILL" in log
    assert not (tmp_path / "kill" / "metrics.json").exists()


@pytest.mark.parametrize("variant", ["zero2", "accelerate"])
def test_two_nodes_deepspeed_and_accelerate(variant, slurm, job_env, tmp_path, cluster_corpus):
    extra, env = {}, dict(job_env)
    if variant == "zero2":
        extra["deepspeed"] = str(REPO / "jobs" / "deepspeed" / "zero2.json")
    else:
        env["HPCNLP_LAUNCHER"] = "accelerate"
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", variant, max_steps=6, save_steps=6, **extra)
    job = sbatch_pretrain(slurm, env, tmp_path, config, "--nodes=2")
    state = slurm.wait(job, timeout=400)
    log = log_of(slurm, job)
    assert state == "COMPLETED", log[-4000:]
    assert "rank 0 of 2 ready" in log and "rank 1 of 2 ready" in log
    assert ("accelerate.commands.launch" in log) == (variant == "accelerate")
    metrics = json.loads((tmp_path / variant / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 6


def test_bad_config_is_refused_at_submit(slurm, job_env, tmp_path, cluster_corpus):
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "bad", max_stepz=3)
    before = slurm.squeue_ids()
    res = subprocess.run(
        [*HPCNLP, "submit", "--config", str(config), "--sbatch=--nodes=1"],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "training.max_stepz: unknown key" in res.stderr and "did you mean 'max_steps'" in res.stderr
    assert "nothing was queued" in res.stderr
    assert slurm.squeue_ids() == before
    assert not (tmp_path / "bad").exists()


def _pipeline(tmp: Path, corpus: Path, fail_first: bool = False) -> Path:
    prepared = tmp / "prepared"
    scratch = tiny_pretrain(tmp, corpus, prepared, "scratch", prepare=False, max_steps=4, save_steps=4)
    prep = tmp / "prepare.yaml"
    prep.write_text(yaml.safe_dump({"job": "prepare", "data_from": str(scratch)}))  # the data it trains on
    stages = [
        {"name": "prepare", "config": str(prep)},
        {"name": "scratch", "config": str(scratch)},
        {
            "name": "continue",
            "config": str(scratch),
            "overrides": {
                "init": "pretrained",
                "model_name_or_path": "${scratch.output_dir}",
                "output_dir": str(tmp / "continue"),
            },
        },
    ]
    if fail_first:  # valid for `check` (a model dir with config.json), fails once the job starts (no
        # tokenizer in it): later stages must never run
        (tmp / "no-tokenizer").mkdir()
        (tmp / "no-tokenizer" / "config.json").write_text("{}")
        stages[0] = {
            "name": "broken",
            "config": str(scratch),
            "overrides": {"output_dir": str(tmp / "broken"), "tokenizer_name_or_path": str(tmp / "no-tokenizer")},
        }
    path = tmp / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {"sbatch": [*SBATCH_SMALL, "--nodes=1", f"--output={tmp}/%x-%j.out"], "stages": stages}, sort_keys=False
        )
    )
    return path


def _submit_pipeline(path: Path, env: dict) -> dict[str, str]:
    res = subprocess.run(
        [*HPCNLP, "pipeline", "--config", str(path)], cwd=path.parent, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return dict(re.findall(r"^(\S+): submitted job (\d+)", res.stdout, re.M))


def test_pipeline_runs_in_order_and_skips_finished_stages(slurm, job_env, tmp_path, cluster_corpus):
    path = _pipeline(tmp_path, cluster_corpus)
    jobs = _submit_pipeline(path, job_env)
    assert list(jobs) == ["prepare", "scratch", "continue"]
    assert (
        "afterok:" + jobs["scratch"] in slurm.job(jobs["continue"]).get("Dependency", "")
        or slurm.state(jobs["continue"]) != "PENDING"
    )
    for name in jobs:
        assert slurm.wait(jobs[name], timeout=400) == "COMPLETED", log_of(slurm, jobs[name])[-3000:]
    times = [(slurm.job(j)["StartTime"], slurm.job(j)["EndTime"]) for j in jobs.values()]
    assert all(times[i][1] <= times[i + 1][0] for i in range(2)), times  # each starts after the previous ended
    cont = json.loads((tmp_path / "continue" / "metrics.json").read_text())
    assert cont["global_step"] == 4
    # Re-run: every stage is finished (prepare: its prepared data), so nothing is queued.
    res = subprocess.run(
        [*HPCNLP, "pipeline", "--config", str(path), "--dry-run"],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert all(f"{name}: complete, skipped" in res.stdout for name in jobs), res.stdout


def test_failed_stage_cancels_the_rest(slurm, job_env, tmp_path, cluster_corpus):
    jobs = _submit_pipeline(_pipeline(tmp_path, cluster_corpus, fail_first=True), job_env)
    assert list(jobs) == ["broken", "scratch", "continue"]
    assert slurm.wait(jobs["broken"], timeout=300) == "FAILED"
    for name in ("scratch", "continue"):  # --kill-on-invalid-dep=yes: cancelled, never started
        assert slurm.wait(jobs[name], timeout=120) == "CANCELLED"
        assert slurm.job(jobs[name]).get("RunTime") == "00:00:00"
    for name in ("scratch", "continue"):  # never started: only the status submit wrote
        assert [p.name for p in (tmp_path / name).iterdir()] == ["status.json"]
        assert json.loads((tmp_path / name / "status.json").read_text())["state"] == "queued"


def test_a_grid_with_2_seeds_on_slurm_and_its_summary(slurm, job_env, tmp_path, cluster_corpus):
    """Issue #30 on the real (test) Slurm: `--grid` of 2 learning rates with `--seeds 1 2` is one array of 4
    tasks; `summary` groups them into 2 rows with mean ± std over the seeds, `--plot` writes the PNG and
    `--tensorboard` one HParams run per task. (The 2 x 2 grid's 8 tasks, the cartesian product and the
    manifest: tests/cluster/test_sweep_grid.py, against the fake Slurm.)"""
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "sweep", max_steps=4, save_steps=2)
    res = subprocess.run(
        [
            *HPCNLP,
            "sweep",
            "--config",
            str(config),
            "--max-parallel",
            "2",
            "--grid",
            "training.learning_rate=[1e-3,1e-2]",
            "--seeds",
            "1",
            "2",
            "--sbatch=--nodes=1",
            "--sbatch=--cpus-per-task=1",
            "--sbatch=--time=30",
        ],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    array, logs = re.search(r"submitted array job (\d+) \(4 tasks\), logs (\S+)", res.stdout).groups()
    assert logs == f"{tmp_path}/outputs/logs/pretrain-sweep-{array}_<task>.out"
    for i in range(4):
        assert slurm.wait(f"{array}_{i}", timeout=600) == "COMPLETED"
    for i in range(4):  # one log per task (the default --output), each of its own task
        log = Path(logs.replace("<task>", str(i))).read_text()
        assert f"output_dir={tmp_path}/sweep/task-{i}" in log and "/task-" not in log.replace(f"/task-{i}", "")
    res = subprocess.run(
        [*HPCNLP, "summary", str(tmp_path / "sweep"), "--keys", "global_step,eval_after.loss", "--plot"]
        + ["--tensorboard"],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| training.learning_rate | n | global_step | eval_after.loss |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    assert [(float(r[0]), r[1], r[2]) for r in rows] == [(1e-3, "2", "4 ± 0"), (1e-2, "2", "4 ± 0")]
    assert all(" ± " in r[3] and not r[3].endswith(" ± 0") for r in rows)  # the seeds' losses differ
    assert rows[0][3] != rows[1][3]  # and the points' do
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "sweep" / "hparams").iterdir()) == [f"task-{i}" for i in range(4)]


def test_submit_freezes_the_config_and_says_queued(slurm, job_env, tmp_path, cluster_corpus):
    """Edits to the YAML after `hpcnlp submit` change nothing in the queued job; status.json says
    queued, then finished, with the job id."""
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "frozen", max_steps=4, save_steps=4)
    res = subprocess.run(
        [
            *HPCNLP,
            "submit",
            "--config",
            str(config),
            "--sbatch=--nodes=1",
            "--sbatch=--hold",
            *(f"--sbatch={o}" for o in SBATCH_SMALL),
            f"--sbatch=--output={tmp_path}/%x-%j.out",
        ],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    job = re.search(r"submitted job (\d+)", res.stdout).group(1)
    status = json.loads((tmp_path / "frozen" / "status.json").read_text())
    assert status["state"] == "queued" and status["queued_job_id"] == job
    config.write_text(config.read_text().replace("max_steps: 4", "max_steps: 3000"))  # too late
    slurm.run("scontrol", "release", job)
    assert slurm.wait(job, timeout=300) == "COMPLETED", log_of(slurm, job)[-3000:]
    assert json.loads((tmp_path / "frozen" / "metrics.json").read_text())["global_step"] == 4
    status = json.loads((tmp_path / "frozen" / "status.json").read_text())
    assert status["state"] == "finished" and status["slurm_job_ids"] == [job]
    frozen = list((tmp_path / "outputs" / ".slurm" / "configs").glob("pretrain-*.yaml"))
    assert len(frozen) == 1 and "max_steps: 4" in frozen[0].read_text() and str(config) in frozen[0].read_text()


def test_prepare_as_an_array_equals_one_task(slurm, job_env, tmp_path, cluster_corpus):
    """`sbatch --array=0-1 slurm/prepare.sbatch`: two tasks build their shards, the last writes the
    index; the prepared bytes equal one local task's."""
    from hpcnlp.config import CorpusConfig
    from hpcnlp.data.pack import prepare
    from hpcnlp.models import load_tokenizer

    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "arr", prepare=False)
    prep = tmp_path / "prepare.yaml"
    prep.write_text(yaml.safe_dump({"job": "prepare", "data_from": str(config), "data": {"shard_mb": 0.01}}))
    array = slurm.sbatch(
        [
            "--array=0-1",
            *SBATCH_SMALL,
            f"--output={tmp_path}/%x-%A_%a.out",
            str(REPO / "slurm" / "prepare.sbatch"),
            str(prep),
        ],
        cwd=tmp_path,
        env=job_env,
    )
    assert [slurm.wait(f"{array}_{i}", timeout=400) for i in range(2)] == ["COMPLETED"] * 2
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    # One finished first and left the index to the other; or both finished together, and the one that lost
    # the index lock waited for the other's index (seen: the same second).
    assert "task 0 of 2" in logs or "task 1 of 2" in logs or "waiting for another preparer" in logs
    data = yaml.safe_load(config.read_text())["data"]
    local = prepare(
        CorpusConfig(**{**data, "shard_mb": 0.01, "prepared_root": str(tmp_path / "local")}),
        load_tokenizer("minilm-l6"),
    )
    arrayed = tmp_path / "prepared" / local.path.name
    assert local.stats["shards"] >= 4 and (arrayed / "stats.json").is_file()
    for f in sorted(local.path.rglob("*.arrow")) + [local.path / "order.npy"]:
        assert (arrayed / f.relative_to(local.path)).read_bytes() == f.read_bytes(), f
