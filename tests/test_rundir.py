"""Issue #28 (red team): who owns an output_dir. Ownership by the run's record of its files, identity by
the resolved path, the flock, finished runs are final, status.json written by the lock holder alone.
One test per case the red team saw on main; real tiny runs where a job must run, else the functions."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, cli, run_cli, tiny_pretrain

from hpcnlp.runtime import rundir, status

SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def holder(out: Path, **env) -> subprocess.Popen:
    """Another process that takes out's lock and holds it until killed (prints its pid once it holds it)."""
    code = f"from hpcnlp.runtime import rundir; rundir.acquire({str(out)!r}); print('held', flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**SUBPROCESS_ENV, **env},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def finished_run(out: Path, run: str, *names: str) -> None:
    """What a finished run leaves: its files and run.json recording them."""
    out.mkdir(parents=True)
    for name in ("model.safetensors", "metrics.json", *names):
        (out / name).write_text("{}")
    (out / "run.json").write_text(json.dumps({"run": run, "files": ["metrics.json", "model.safetensors", *names]}))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. ownership by record --------------------------------------------------------------------
def test_overwrite_never_removes_what_no_run_recorded(tmp_path, capsys):
    """main: exit 0, the dir moved aside then removed, the user's notes and data gone."""
    config = tiny_pretrain(tmp_path)
    out = tmp_path / "out"
    finished_run(out, "another-config")
    (out / "my_notes.txt").write_text("mine")
    (out / "user_data").mkdir()
    (out / "user_data" / "x.csv").write_text("1,2")
    for command in ("check", "pretrain"):  # check = run
        assert run_cli(command, "--config", str(config), "overwrite=true") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds files hpcnlp did not write: my_notes.txt, user_data" in err[0], err
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "user_data" / "x.csv").is_file()
    assert not list(tmp_path.glob(".out.replaced-*"))


def test_a_requeued_start_is_refused_another_configs_run(tmp_path, monkeypatch, capsys):
    """main: SLURM_RESTART_COUNT > 0 skipped the check; the other config's run.json and model were replaced."""
    config = tiny_pretrain(tmp_path)
    out = tmp_path / "out"
    finished_run(out, "another-config")
    before = (out / "run.json").read_text()
    monkeypatch.setenv("SLURM_JOB_ID", "7001")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_cli("pretrain", "--config", str(config)) == 2
    assert "holds a run of another config" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before and (out / "model.safetensors").read_text() == "{}"


def test_replaced_runs_are_carried_forward_never_orphaned(tmp_path):
    """main: a failed overwrite followed by another left the first replaced run on disk forever."""
    out = tmp_path / "out"
    finished_run(out, "a")
    rundir.acquire(out)
    try:
        assert rundir.claim(out, "b", overwrite=True, job="pretrain") == rundir.REPLACE
        (out / "checkpoint-1").mkdir()  # b fails before finishing: its replaced run is still aside
        rundir.record_files(out)
        assert rundir.claim(out, "c", overwrite=True, job="pretrain") == rundir.REPLACE
        asides = json.loads((out / "run.json").read_text())["replaced"]
        assert len(asides) == 2 and all(Path(p).is_dir() for p in asides)
        # c crashes before writing anything: the dir holds only its records, d starts there afresh
        assert rundir.claim(out, "d", overwrite=False, job="pretrain") == rundir.FRESH
        assert json.loads((out / "run.json").read_text())["replaced"] == asides
        rundir.finish(out)
    finally:
        rundir.release(out)
    assert not list(tmp_path.glob(".out.replaced-*"))  # a's and b's runs, both deleted once c finished


def test_files_found_when_a_run_goes_on_never_become_its_own(tmp_path):
    """A user's notes in an unfinished run's dir, the run resumed: overwrite later still refuses to remove them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    (out / "run.json").write_text(json.dumps({"run": "a", "files": ["checkpoint-1"]}))
    (out / "my_notes.txt").write_text("mine")
    rundir.acquire(out)
    try:
        assert rundir.claim(out, "a", overwrite=False, job="pretrain", resume="auto") == rundir.CONTINUE
        (out / "checkpoint-2").mkdir()
        rundir.record_files(out)
        assert json.loads((out / "run.json").read_text())["files"] == ["checkpoint-1", "checkpoint-2"]
        with pytest.raises(rundir.OutputDirRefused, match="did not write: my_notes.txt$"):
            rundir.claim(out, "b", overwrite=True, job="pretrain")
    finally:
        rundir.release(out)


# --- identity by resolved path -----------------------------------------------------------------
def test_one_dir_through_a_symlink_is_one_lock_and_one_input(tmp_path):
    """main: the lock and the overlap checks compared spellings; two runs at once both exit 0."""
    from hpcnlp.checks import overlaps

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    proc = holder(real)
    try:
        with pytest.raises(rundir.OutputDirRefused, match=f"in use by pid {proc.pid}"):
            rundir.acquire(link)
        with pytest.raises(rundir.OutputDirRefused):
            rundir.acquire(tmp_path / "x" / ".." / "real")
    finally:
        proc.kill()
        proc.wait()
    assert overlaps(str(link / "sub"), {"model_name_or_path": str(real)})  # the output lies in the input


# --- the lock ----------------------------------------------------------------------------------
def _race(out: str, barrier, tried, got, done) -> None:
    barrier.wait()
    try:
        rundir.acquire(out)
        with got.get_lock():
            got.value += 1
    except rundir.OutputDirRefused:
        pass
    with tried.get_lock():
        tried.value += 1
    done.wait(30)  # a holder holds on while the others try


def test_racing_for_a_dead_holders_lock_makes_exactly_one_holder(tmp_path):
    """main: unlink-then-retry; 6 processes racing for a dead holder's lock made two holders once in 10."""
    ctx = multiprocessing.get_context("fork")
    n = 6
    for trial in range(10):
        out = tmp_path / f"out-{trial}"
        dead = holder(out)  # leaves its record in the lock file
        dead.kill()
        dead.wait()
        barrier, tried, got, done = ctx.Barrier(n), ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
        procs = [ctx.Process(target=_race, args=(str(out), barrier, tried, got, done)) for _ in range(n)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while tried.value < n and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        for p in procs:
            p.join(30)
        assert tried.value == n and got.value == 1, f"trial {trial}: {got.value} holders"


def test_one_job_id_twice_and_an_unreachable_scheduler_mean_alive(tmp_path, monkeypatch):
    """main: a second process of the same SLURM_JOB_ID took over a live holder, and a failing squeue
    ("Unable to contact slurm controller") counted as "holder gone"."""
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    proc = holder(out, SLURM_JOB_ID="4242")  # one salloc, two runs
    try:
        with pytest.raises(rundir.OutputDirRefused, match="in use by job 4242 pid"):
            rundir.acquire(out)
    finally:
        proc.kill()
        proc.wait()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    elsewhere = {"slurm_job_id": "99", "host": "node-elsewhere", "pid": 1, "since": "then"}
    assert rundir.record_alive(elsewhere) is True
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert rundir.record_alive(elsewhere) is False  # Slurm says that job is over


# --- status.json: the lock holder's alone --------------------------------------------------------
def test_a_start_refused_by_the_lock_writes_nothing_into_the_live_runs_status(tmp_path, capsys):
    """main: the refused start wrote "running", then "failed", into the live run's status.json."""
    config = tiny_pretrain(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    live = json.dumps({"state": "running", "step": 3, "job": "pretrain"})
    (out / "status.json").write_text(live)
    proc = holder(out)
    try:
        assert run_cli("pretrain", "--config", str(config)) == 2
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
        assert (out / "status.json").read_text() == live
    finally:
        proc.kill()
        proc.wait()


def test_submit_and_cancel_write_status_only_when_no_job_holds_the_run(tmp_path):
    """main: `hpcnlp submit`/`sweep` ("queued") and `cancel` ("cancelled") wrote status.json beside the job
    holding the run, whose own last write could then land before or after theirs. Now they write under
    the run's lock: never while a job holds it; cancel waits for the job scancel ended to let go."""
    out = tmp_path / "out"
    out.mkdir()
    live = json.dumps({"state": "running", "step": 3})
    (out / "status.json").write_text(live)
    proc = holder(out)
    try:
        assert status.update_outside(out / "status.json", state="queued") is False
        assert (out / "status.json").read_text() == live
        threading.Timer(1.0, proc.kill).start()  # the cancelled job ends a second later
        assert status.update_outside(out / "status.json", wait=30, state="cancelled") is True
        assert json.loads((out / "status.json").read_text())["state"] == "cancelled"
        assert rundir.holder_alive(out) is False  # and the lock is free again
    finally:
        proc.kill()
        proc.wait()
    # no lock file: no training job ever claimed the dir (export, validate): written at once, no lock file made
    fresh = tmp_path / "export" / "status.json"
    assert status.update_outside(fresh, state="queued") is True and json.loads(fresh.read_text())["state"] == "queued"
    assert not rundir.lock_path(fresh.parent).exists()
    assert status.update_outside(None, state="queued") is False  # prepare: no status file


def test_a_stall_writes_failed_into_status(tmp_path):
    """main: status.stalled exited 4 and status.json said "running" forever."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from hpcnlp.runtime import rundir, status
        out = Path({str(out)!r})
        rundir.acquire(out)
        status.update(out / "status.json", create=True, state="running")
        status.stalled("rank 1 on n2: no training step for 15.0 min", out / "status.json")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert proc.returncode == status.EXIT_STALLED, proc.stderr
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "failed" and "stalled: rank 1 on n2" in st["reason"]


def test_rank_0s_outcome_never_replaces_a_stalled_line(tmp_path, monkeypatch):
    """main: rank 0's outcome line overwrote the "stalled" line another rank wrote first."""
    outcome = tmp_path / "outcome"
    monkeypatch.setenv("HPCNLP_OUTCOME_FILE", str(outcome))
    outcome.write_text("4 stop rank 1 on n2: no training step for 15.0 min\n")  # what stalled() wrote
    status.record_outcome(status.EXIT_FAILED, False, "RuntimeError: gloo connection reset")
    assert outcome.read_text().startswith("4 stop rank 1 on n2")


@pytest.mark.slow
def test_a_signal_before_training_is_a_requeue_not_a_bare_death(tmp_path):
    """main: USR1 before the handlers were installed killed the process (rc 138 under bash), status.json
    kept saying "running"."""
    config = tiny_pretrain(tmp_path)
    code = textwrap.dedent(f"""
        import os, signal, sys
        from hpcnlp.runtime import rundir
        take = rundir.acquire
        def signalled_then_take(d):  # Slurm's warning arrives as the job starts
            os.kill(os.getpid(), signal.SIGUSR1)
            return take(d)
        rundir.acquire = signalled_then_take
        from hpcnlp.cli import main
        sys.exit(main(["pretrain", "--config", {str(config)!r}]))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "preempted"


def test_status_reports_a_killed_holder_on_another_node_as_stale(tmp_path):
    """main: "running" forever after kill -9 when the holder ran on another node (its pid unknowable here)."""
    from hpcnlp.cluster.status import status_row

    out = tmp_path / "out"
    proc = holder(out)
    status.update(out / "status.json", create=True, state="running", job="pretrain")
    assert status_row("out", out / "status.json", output_dir=out)["state"] == "running"
    record = json.loads(rundir.lock_path(out).read_text())
    rundir.lock_path(out).write_text(json.dumps({**record, "host": "node-elsewhere"}))  # a compute node's run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert status_row("out", out / "status.json", output_dir=out)["state"] == "stale: process gone"


# --- finished is final -----------------------------------------------------------------------------
@pytest.fixture
def finished_via_link(tmp_path):
    """A finished tiny pretrain whose output_dir is a symlink to real-out: (config, real dir)."""
    real = tmp_path / "real-out"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)  # tiny_pretrain's output_dir, a link
    config = tiny_pretrain(tmp_path)
    assert run_cli("pretrain", "--config", str(config)) == 0
    return config, real


@pytest.mark.slow
def test_a_finished_run_is_final_unless_overwrite(finished_via_link, tmp_path, capsys):
    """main: rerun unchanged (resume: auto) trained "step 7/6" into the finished run, and so did
    overwrite: true with resume: auto; a symlinked output_dir with overwrite crashed in rmtree (exit 1)."""
    config, real = finished_via_link
    model, metrics = sha(real / "model.safetensors"), (real / "metrics.json").read_text()
    capsys.readouterr()
    assert run_cli("pretrain", "--config", str(config), "resume=auto") == 0
    assert "finished: nothing to train" in capsys.readouterr().err
    assert sha(real / "model.safetensors") == model and (real / "metrics.json").read_text() == metrics
    assert run_cli("pretrain", "--config", str(config), "overwrite=true", "resume=auto") == 0  # overwrite wins
    m = json.loads((real / "metrics.json").read_text())
    assert m["global_step"] == 6 and m["resumed_from"] is None
    assert (tmp_path / "out").is_symlink() and not list(tmp_path.glob(".*replaced-*"))


@pytest.mark.slow
def test_resume_continue_trains_a_finished_run_on_to_a_raised_max_steps(finished_via_link):
    config, real = finished_via_link
    assert run_cli("check", "--config", str(config), "resume=continue", "training.max_steps=9") == 0
    assert run_cli("pretrain", "--config", str(config), "resume=continue", "training.max_steps=9") == 0
    m = json.loads((real / "metrics.json").read_text())
    assert m["global_step"] == 9 and m["resumed_from"].endswith("checkpoint-6")
    assert run_cli("pretrain", "--config", str(config), "resume=continue", "training.max_steps=9") == 0
    assert json.loads((real / "metrics.json").read_text()) == m  # at max_steps: final again


# --- sweep -----------------------------------------------------------------------------------------
def test_sweep_never_writes_into_a_dir_it_does_not_own(tmp_path, monkeypatch, fake_slurm):
    """main: `hpcnlp sweep` wrote sweep.json into a base output_dir holding a run and a user's files."""
    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "cluster.yaml").write_text("gpus_per_node: 0\ncpus_per_task: 4\n")
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HPCNLP_CLUSTER", str(tmp_path / "cluster.yaml"))
    base = tmp_path / "outputs" / "finetune-sentiment"
    finished_run(base, "someone-elses")
    proc = cli("sweep", "--config", "jobs/finetune-sentiment.yaml", "--grid", "training.seed=[1,2]", cwd=tmp_path)
    assert proc.returncode == 2 and "holds files no sweep wrote: metrics.json, model.safetensors" in proc.stderr
    assert fake_slurm.calls("sbatch") == [] and not (base / "sweep.json").exists()
