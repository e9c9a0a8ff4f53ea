"""Chaos on a real 2-node Slurm: a seeded schedule of faults over short runs of one config.

Each run either ends with the uninterrupted run's step count and logged losses (within 1e-4), or
stops with a classified failure (the batch script's exit code and status.json say which) after at
most max_requeues requeues. None resumes from an incomplete checkpoint, none loops. The fault /
outcome table is printed (`pytest -s`) and checked.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_jobs import REPO, log_of, tiny_pretrain
from test_slurm import SBATCH_SMALL, _pids_of_rank, logged_losses, wait_for_log

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SEED = 2026
RUN = {"max_steps": 60, "save_steps": 20, "logging_steps": 5, "eval_strategy": "steps", "eval_steps": 20}
TOL = 1e-4
TABLE: list[dict] = []


def submit(
    slurm, chaos: dict, name: str, overrides: tuple[str, ...] = (), where: Path | None = None, **training
) -> str:
    """sbatch the chaos config (2 nodes) into <tmp>/<name>; `overrides`: top-level key=value."""
    tmp = chaos["tmp"]
    config = tiny_pretrain(where or tmp, chaos["corpus"], tmp / "prepared", name, **{**RUN, **training})
    return slurm.sbatch(
        [
            *SBATCH_SMALL,
            "--nodes=2",
            f"--output={tmp}/{name}-%j.out",
            str(REPO / "slurm" / "pretrain.sbatch"),
            str(config),
            *overrides,
        ],
        cwd=tmp,
        env=chaos["env"],
    )


def usr1(slurm, job: str) -> None:
    slurm.run("scancel", "--signal=USR1", "--batch", job)


def wait_restart(slurm, job: str, restarts: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while int(slurm.job(job).get("Restarts", 0)) < restarts and time.time() < deadline:
        time.sleep(0.3)
    assert int(slurm.job(job).get("Restarts", 0)) == restarts, log_of(slurm, job)[-3000:]


def exit_code(slurm, job: str) -> int:
    return int(slurm.job(job).get("ExitCode", "0:0").split(":")[0])


def same_as_reference(out: Path, ref: Path, log: str) -> float:
    """Largest logged-loss difference to the uninterrupted run: same steps, none lost, none repeated.
    The first logged loss after a resume averages fewer steps (the interval restarts): not compared."""
    got, want = logged_losses(out, RUN["max_steps"]), logged_losses(ref, RUN["max_steps"])
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    resumed = [
        int(s)
        for s in re.findall(r"\[rank 0\] INFO hpcnlp.runtime.preempt: rank 0 of 2 ready at step (\d+)", log)
        if int(s) > 0
    ]
    first_after = {min((s for s in got if s > step), default=None) for step in resumed}
    worst = max(abs(got[s] - want[s]) for s in got if s not in first_after)
    assert worst < TOL, worst
    return worst


@pytest.fixture(scope="module")
def chaos(slurm, job_env, tmp_path_factory, cluster_corpus):
    chaos = {
        "tmp": tmp_path_factory.mktemp("chaos"),
        "corpus": cluster_corpus,
        "env": job_env,
        "rng": random.Random(SEED),
    }
    ref = submit(slurm, chaos, "reference")
    assert slurm.wait(ref, timeout=400) == "COMPLETED", log_of(slurm, ref)[-3000:]
    chaos["ref"] = chaos["tmp"] / "reference"
    yield chaos
    print("\n| run | faults | outcome |\n|---|---|---|")
    for row in TABLE:
        print(f"| {row['run']} | {row['faults']} | {row['outcome']} |")


def test_preempted_at_a_step_during_eval_and_during_a_save(slurm, chaos):
    """Three USR1s: at a random step, while evaluating, while a checkpoint is being written."""
    tmp, rng = chaos["tmp"], chaos["rng"]
    job = submit(slurm, chaos, "three-signals")
    step = 5 * rng.randrange(1, 3)  # a logged step before 20
    wait_for_log(slurm, job, rf"hpcnlp\.train: step {step}/")
    usr1(slurm, job)
    wait_restart(slurm, job, 1)
    slurm.start_now(job)
    # Step 20 is logged, then evaluated, then saved: a signal at its log line lands in the evaluation.
    wait_for_log(slurm, job, r"hpcnlp\.train: step 20/", after="restart 1 on")
    usr1(slurm, job)
    wait_restart(slurm, job, 2)
    slurm.start_now(job)
    out = tmp / "three-signals"
    deadline = time.time() + 240
    marked = {p.name for p in out.glob("checkpoint-*")}
    while time.time() < deadline:  # the next checkpoint dir appears: signal while it is written
        new = {p.name for p in out.glob("checkpoint-*")} - marked
        if new:
            usr1(slurm, job)
            break
        time.sleep(0.01)
    wait_restart(slurm, job, 3)
    slurm.start_now(job)
    assert slurm.wait(job, timeout=400) == "COMPLETED", log_of(slurm, job)[-3000:]
    log = log_of(slurm, job)
    worst = same_as_reference(out, chaos["ref"], log)
    assert log.count("requeueing job") == 3 and log.count("FAILED") == 0 and "ChildFailedError" not in log
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    TABLE.append(
        {
            "run": "three-signals",
            "faults": f"USR1 at step {step}, during the eval at step 20, during a save",
            "outcome": f"COMPLETED after 3 requeues, 60/60 steps, max loss diff {worst:.1e}",
        }
    )


def test_truncated_newest_checkpoint_is_skipped(slurm, chaos):
    tmp, rng = chaos["tmp"], chaos["rng"]
    job = submit(slurm, chaos, "truncated")
    step = 5 * rng.randrange(5, 8)  # a logged step after checkpoint-20: an older complete one exists
    wait_for_log(slurm, job, rf"hpcnlp\.train: step {step}/")
    usr1(slurm, job)
    wait_restart(slurm, job, 1)
    out = tmp / "truncated"
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk that lost the tail of the file
    slurm.start_now(job)
    assert slurm.wait(job, timeout=400) == "COMPLETED", log_of(slurm, job)[-3000:]
    log = log_of(slurm, job)
    assert f"not resuming from {newest}: model.safetensors is missing or truncated" in log
    assert "resuming from " + str(out / "checkpoint-20") in log
    worst = same_as_reference(out, chaos["ref"], log)
    TABLE.append(
        {
            "run": "truncated",
            "faults": f"USR1, then {newest.name} truncated before the restart",
            "outcome": f"COMPLETED from checkpoint-20 (skipped {newest.name}), max loss diff {worst:.1e}",
        }
    )


def test_rank_killed_mid_save_then_resubmitted(slurm, chaos):
    tmp = chaos["tmp"]
    job = submit(slurm, chaos, "killed")
    out = tmp / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-20").exists():
        time.sleep(0.005)
    for pid in _pids_of_rank(slurm, job, 1):
        os.kill(pid, signal.SIGKILL)
    assert slurm.wait(job, timeout=120) == "FAILED"
    assert exit_code(slurm, job) == 1 and int(slurm.job(job).get("Restarts", 0)) == 0  # a crash: no requeue
    marked = (out / "checkpoint-20" / "hpcnlp-checkpoint.json").exists()
    again = submit(slurm, chaos, "killed", ("resume=auto",))
    assert slurm.wait(again, timeout=400) == "COMPLETED", log_of(slurm, again)[-3000:]
    worst = same_as_reference(out, chaos["ref"], log_of(slurm, again))
    TABLE.append(
        {
            "run": "killed",
            "faults": "SIGKILL of rank 1 as checkpoint-20 was written",
            "outcome": f"FAILED exit 1, no requeue; checkpoint-20 {'complete' if marked else 'unmarked, skipped'}; "
            f"resubmitted with resume: auto: COMPLETED, max loss diff {worst:.1e}",
        }
    )


def test_save_without_space_fails_once_and_never_loops(slurm, chaos):
    tmp = chaos["tmp"]
    small = tmp / "small-disk"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        job = submit(slurm, chaos, "full", where=small)
        wait_for_log(slurm, job, r"hpcnlp\.train: step \d+/")
        usr1(slurm, job)
        assert slurm.wait(job, timeout=240) == "FAILED", log_of(slurm, job)[-3000:]
        log = log_of(slurm, job)
        assert exit_code(slurm, job) == 1 and int(slurm.job(job).get("Restarts", 0)) == 0, log[-3000:]
        assert "No space left on device" in log and "requeueing" not in log
    finally:
        subprocess.run(["umount", "-l", str(small)])
    TABLE.append(
        {
            "run": "full",
            "faults": "USR1 with output_dir on a 1 MB filesystem (the save fails)",
            "outcome": "FAILED exit 1 (No space left on device), 0 requeues",
        }
    )


def test_stalled_rank_fails_the_job_naming_it(slurm, chaos):
    job = submit(slurm, chaos, "stalled", ("step_timeout_minutes=0.25",), max_steps=100000, save_steps=100000)
    wait_for_log(slurm, job, r"hpcnlp\.train: step \d+/")
    pids = [int(wait_for_log(slurm, job, r"rank 1 of 2 ready at step \d+ \(pid (\d+)").group(1))]
    t0 = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert slurm.wait(job, timeout=180) == "FAILED"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    seconds = time.time() - t0
    log = log_of(slurm, job)
    assert exit_code(slurm, job) == 4 and re.search(r"exit 4: rank 0 on \S+: no training step .*stalled: rank 1", log)
    TABLE.append(
        {
            "run": "stalled",
            "faults": "SIGSTOP of rank 1 mid-training (step_timeout_minutes 0.25)",
            "outcome": f"FAILED exit 4 after {seconds:.0f} s, naming rank 1",
        }
    )


def test_requeue_cap_stops_a_job_that_keeps_being_preempted(slurm, chaos):
    tmp = chaos["tmp"]
    job = submit(slurm, chaos, "capped", ("max_requeues=1",))
    for restart in (0, 1):
        wait_for_log(slurm, job, r"hpcnlp\.train: step \d+/", after=f"restart {restart} on")
        usr1(slurm, job)
        if restart == 0:
            wait_restart(slurm, job, 1)
            slurm.start_now(job)
    assert slurm.wait(job, timeout=240) == "FAILED"
    log = log_of(slurm, job)
    assert exit_code(slurm, job) == 75 and log.count("requeueing job") == 1
    assert "reached max_requeues (1)" in log
    status = json.loads((tmp / "capped" / "status.json").read_text())
    assert status["state"] == "preempted" and status["restarts"] == 1
    TABLE.append(
        {
            "run": "capped",
            "faults": "USR1 twice with max_requeues 1",
            "outcome": "requeued once, then stopped: exit 75, 'reached max_requeues (1)', checkpoint kept",
        }
    )
