"""Our jobs on a production-like Slurm site (LocalSlurm(site=True); docs/reliability.md, "The test site").

Each test names the site settings it depends on. The cluster: 2 slurmd nodes n1, n2 on this machine,
CPUs=2 and 4 fake GPUs (GRES) each; partitions cpu (default), gpu (preemptable, GraceTime) and
gpu-high (higher PriorityTier); accounting through slurmdbd into MariaDB.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from cluster_jobs import REPO, log_of, tiny_pretrain
from slurm_harness import SITE_ACCOUNTS, SITE_GPUS, SITE_GRACE
from test_slurm import logged_losses, wait_for_log

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PRETRAIN = str(REPO / "slurm" / "pretrain.sbatch")
# Long enough that a preemption lands mid-training on 2 shared cores; checkpoints every 40 steps.
RUN = {"max_steps": 160, "save_steps": 40, "logging_steps": 5}
TOL = 1e-4  # as tests/slurm/test_slurm.py: resumed runs equal the uninterrupted one to all printed digits

# Every Python process started with this directory first on PYTHONPATH runs it; the ranks (RANK and
# LOCAL_RANK set by torchrun) record where they run and which CPUs they may use, then go on unchanged.
PROBE = """
import json, os
_out = os.environ.get("SITE_AFFINITY_PROBE")
if _out and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
    with open(os.path.join(_out, "rank-%s-%d.json" % (os.environ["RANK"], os.getpid())), "w") as _f:
        json.dump({"rank": int(os.environ["RANK"]), "node": os.environ.get("SLURMD_NODENAME"),
                   "cpus": sorted(os.sched_getaffinity(0)), "job": os.environ.get("SLURM_JOB_ID"),
                   "step": os.environ.get("SLURM_STEP_ID"),
                   "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK")}, _f)
"""


def sbatch_pretrain(site, env: dict, tmp: Path, config: Path, *opts: str) -> str:
    return site.sbatch(["--time=30", f"--output={tmp}/%x-%j.out", *opts, PRETRAIN, str(config)], cwd=tmp, env=env)


# --- fake GPUs ----------------------------------------------------------------------------
def test_fake_gpus_are_scheduled_and_visible(site, site_env, tmp_path):
    """Site: GresTypes=gpu, NodeName=... Gres=gpu:4, gres.conf `AutoDetect=off` + `File=` device files.
    `--gres=gpu:2` is scheduled, counted (TRES) and exported to the job and its steps."""
    script = tmp_path / "gpus.sh"
    script.write_text(
        "#!/bin/bash\nsrun bash -c 'echo \"$SLURMD_NODENAME gpus=$SLURM_GPUS_ON_NODE cvd=$CUDA_VISIBLE_DEVICES\"'\n"
    )
    job = site.sbatch(
        [
            "-p",
            "gpu",
            "--gres=gpu:2",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--time=5",
            f"--output={tmp_path}/gpus-%j.out",
            str(script),
        ],
        cwd=tmp_path,
        env=site_env,
    )
    assert site.wait(job, timeout=120) == "COMPLETED", log_of(site, job)
    lines = sorted(log_of(site, job).split("\n"))
    assert [line for line in lines if line] == ["n1 gpus=2 cvd=0,1", "n2 gpus=2 cvd=0,1"]
    assert "gres/gpu=4" in site.job(job)["TRES"]  # 2 per node on 2 nodes
    # More than a node has: refused at submit, as on a real site.
    res = site.run("sbatch", "-p", "gpu", f"--gres=gpu:{SITE_GPUS + 1}", "--wrap=true", check=False, cwd=str(tmp_path))
    assert res.returncode != 0 and "Requested node configuration is not available" in res.stderr


# --- a. CPU binding -----------------------------------------------------------------------
@pytest.mark.parametrize("cpus", [2, 1])
def test_every_rank_is_bound_to_the_cpus_it_asked_for(site, site_env, tmp_path, cluster_corpus, cpus):
    """Site: TaskPlugin=task/affinity, SelectType=select/cons_tres + CR_Core, CPUs=2 per node.

    `sbatch slurm/pretrain.sbatch --cpus-per-task=N` over 2 nodes: our launcher's srun step (one task
    per node, torchrun inside) must give every rank the N CPUs the job holds on its node, no fewer
    (ranks squeezed onto one core) and no more. N=1 shows the binding is real: the machine has 2."""
    probe, seen = tmp_path / "probe", tmp_path / "seen"
    probe.mkdir()
    seen.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    env = {
        **site_env,
        "SITE_AFFINITY_PROBE": str(seen),
        "PYTHONPATH": ":".join(p for p in (str(probe), site_env.get("PYTHONPATH", "")) if p),
    }
    config = tiny_pretrain(tmp_path, cluster_corpus, tmp_path / "prepared", "aff", max_steps=2, save_steps=2)
    job = sbatch_pretrain(site, env, tmp_path, config, "-p", "cpu", "--nodes=2", f"--cpus-per-task={cpus}")
    assert site.wait(job, timeout=400) == "COMPLETED", log_of(site, job)[-3000:]
    ranks = sorted((json.loads(p.read_text()) for p in seen.glob("rank-*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["job"]) for r in ranks] == [(0, job), (1, job)], ranks
    assert {r["node"] for r in ranks} == {"n1", "n2"}
    allocated = allocated_cpus(site, job)
    print(
        f"--cpus-per-task={cpus}: allocated {allocated}; ranks see "
        + ", ".join(f"rank {r['rank']} on {r['node']}: {r['cpus']} (step {r['step']})" for r in ranks)
    )
    for r in ranks:
        assert len(r["cpus"]) == cpus, f"rank {r['rank']} on {r['node']} may use CPUs {r['cpus']}, asked for {cpus}"
        assert r["cpus"] == allocated[r["node"]]  # the node's CPUs of this job, the same on a one-core-per-id box


def allocated_cpus(site, job: str) -> dict[str, list[int]]:
    """Per node, the CPU ids Slurm allocated to the job (`scontrol -d show job`: Nodes=n[1-2] CPU_IDs=0-1)."""
    out = {}
    for nodes, ids in re.findall(r"Nodes=(\S+) CPU_IDs=(\S+)", site.run("scontrol", "-d", "show", "job", job).stdout):
        cpus = [i for part in ids.split(",") for i in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
        for node in site.run("scontrol", "show", "hostnames", nodes).stdout.split():
            out[node] = cpus
    return out


# --- b, c. preemption and accounting ------------------------------------------------------
@pytest.fixture(scope="module")
def preemption(site, site_env, tmp_path_factory, cluster_corpus):
    """An uninterrupted run, then the same config preempted by a higher-tier job, both as 2-node GPU
    jobs (4 fake GPUs each node, one process per node as in the other tests: HPCNLP_NPROC_PER_NODE=1)."""
    tmp = tmp_path_factory.mktemp("preempt")
    # Fake GPUs: torch here has no CUDA, so the job's CUDA guard is told the CPU is meant.
    env = {**site_env, "HPCNLP_NPROC_PER_NODE": "1", "HPCNLP_ALLOW_CPU": "1"}
    gpu_job = ("-p", "gpu", f"--gres=gpu:{SITE_GPUS}", "--nodes=2", "--cpus-per-task=1")

    ref_config = tiny_pretrain(tmp, cluster_corpus, tmp / "prepared", "ref", **RUN)
    ref = sbatch_pretrain(site, env, tmp, ref_config, *gpu_job)
    assert site.wait(ref, timeout=400) == "COMPLETED", log_of(site, ref)[-3000:]

    config = tiny_pretrain(tmp, cluster_corpus, tmp / "prepared", "low", prepare=False, **RUN)
    low = sbatch_pretrain(site, env, tmp, config, *gpu_job)
    wait_for_log(site, low, r"hpcnlp\.train: step \d+/", after="restart 0 on")
    # The urgent job wants all GPUs of one node: only preempting the low-tier job frees them.
    high = site.sbatch(
        [
            "-p",
            "gpu-high",
            f"--gres=gpu:{SITE_GPUS}",
            "--nodes=1",
            "--cpus-per-task=1",
            "--time=5",
            "--job-name=urgent",
            f"--output={tmp}/urgent-%j.out",
            "--wrap=sleep 5",
        ],
        cwd=tmp,
        env=env,
    )
    submitted = time.time()
    deadline = submitted + SITE_GRACE + 120
    while int(site.job(low).get("Restarts", 0)) < 1 and time.time() < deadline:
        time.sleep(0.5)
    requeued = time.time()
    assert int(site.job(low).get("Restarts", 0)) == 1, log_of(site, low)[-3000:]
    assert site.wait(high, timeout=120) == "COMPLETED", log_of(site, high)
    site.start_now(low)  # skip Slurm's delay before a requeued job may start again
    assert site.wait(low, timeout=400) == "COMPLETED", log_of(site, low)[-3000:]
    return {
        "tmp": tmp,
        "ref": ref,
        "low": low,
        "high": high,
        "log": log_of(site, low),
        "seconds_to_requeue": requeued - submitted,
    }


def test_preempted_by_a_higher_tier_job_checkpoints_requeues_and_matches(site, preemption):
    """Site: PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, partition gpu (PriorityTier=1,
    GraceTime=60) under gpu-high (PriorityTier=10), GRES gpu:4 per node.

    At preemption Slurm sends SIGTERM to every process of the job's steps (not to the batch shell, and
    not the job's --signal=B:USR1, which only comes before the time limit), then SIGKILL after
    GraceTime. The ranks take SIGTERM as a preemption request (src/hpcnlp/runtime/preempt.py): they
    checkpoint at the next step, rank 0's outcome says requeue and slurm/launch.sh requeues the job
    within GraceTime; it resumes and ends with the uninterrupted run's steps and losses."""
    p, log = preemption, preemption["log"]
    print(
        f"urgent job {p['high']} submitted; job {p['low']} checkpointed and requeued after "
        f"{p['seconds_to_requeue']:.1f} s (GraceTime {SITE_GRACE} s)"
    )
    assert p["seconds_to_requeue"] < SITE_GRACE  # checkpointed and left before SIGKILL
    assert re.search(r"\[rank 0\] WARNING hpcnlp\.runtime\.preempt: received SIGTERM", log), log[-3000:]
    assert "USR1" not in log  # the warning signal played no part
    step = int(re.search(r"\[rank 0\] WARNING hpcnlp\.\S+: checkpointed at step (\d+)", log).group(1))
    assert 0 < step < RUN["max_steps"]
    assert log.count("requeueing job") == 1 and "restart 1 on" in log
    resumed = [
        int(s) for s in re.findall(r"\[rank 0\] INFO hpcnlp.runtime.preempt: rank 0 of 2 ready at step (\d+)", log)
    ]
    assert resumed == [0, step]
    # The SIGTERM is Slurm's preemption (srun relays slurmstepd's notice), not a test's scancel; the
    # batch shell got nothing (slurm/launch.sh traps USR1 only, and said nothing).
    assert re.search(rf"slurmstepd-n\d: error: \*\*\* STEP {p['low']}\.0 ON n\d CANCELLED", log), log[-3000:]

    out, ref = p["tmp"] / "low", p["tmp"] / "ref"
    got, want = json.loads((out / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text())
    assert got["global_step"] == want["global_step"] == RUN["max_steps"]  # none lost, none repeated
    losses, ref_losses = logged_losses(out, RUN["max_steps"]), logged_losses(ref, RUN["max_steps"])
    assert sorted(losses) == sorted(ref_losses)
    short = {min(s for s in losses if s > step)}  # the first logged loss after the resume averages fewer steps
    worst = max(abs(losses[s] - ref_losses[s]) for s in losses if s not in short)
    diff = abs(got["eval_after"]["loss"] - want["eval_after"]["loss"])
    print(
        f"preempted at step {step}: final eval loss {got['eval_after']['loss']:.6f} vs uninterrupted "
        f"{want['eval_after']['loss']:.6f}; max logged-loss diff {worst:.2e}"
    )
    assert diff < TOL and worst < TOL


def test_accounting_records_the_requeue(site, preemption):
    """Site: AccountingStorageType=accounting_storage/slurmdbd (MariaDB), AccountingStorageEnforce=
    associations,limits,qos, accounts added with sacctmgr. `sacct --duplicates` shows each run of the
    requeued job, from slurmdbd, with the account and QOS it ran under."""
    p = preemption
    fields = "JobID,JobName,Partition,Account,QOS,State,ExitCode,AllocTRES"
    rows: list[dict] = []
    deadline = time.time() + 60
    while time.time() < deadline:  # slurmctld sends job records to slurmdbd asynchronously
        out = site.run("sacct", "-j", f"{p['low']},{p['high']}", "--duplicates", "-X", "-n", "-P", "-o", fields).stdout
        rows = [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines() if line]
        low = [r["State"] for r in rows if r["JobID"] == p["low"]]
        if low and low[-1] == "COMPLETED" and len(low) >= 2 and any(r["JobID"] == p["high"] for r in rows):
            break
        time.sleep(1)
    print("\n".join(" | ".join(r.values()) for r in rows))
    low = [r for r in rows if r["JobID"] == p["low"]]
    assert [r["State"] for r in low] == ["REQUEUED", "COMPLETED"], rows
    assert all(r["Partition"] == "gpu" and r["Account"] == SITE_ACCOUNTS[0] and r["QOS"] == "normal" for r in low)
    assert all(f"gres/gpu={2 * SITE_GPUS}" in r["AllocTRES"] for r in low)
    high = [r for r in rows if r["JobID"] == p["high"]]
    assert [(r["Partition"], r["State"]) for r in high] == [("gpu-high", "COMPLETED")]
    # A job without a valid account is refused: the associations are enforced.
    res = site.run("sbatch", "--account=nobody", "--wrap=true", check=False, cwd=str(p["tmp"]))
    assert res.returncode != 0 and "Invalid account" in res.stderr


# --- the quickstart, as docs/quickstart.md writes it ------------------------------------------
SITE_PROFILE = """# docs/quickstart.md's GPU profile, for this site: its partitions and account; no container here
# (no apptainer on this machine); one process per node and HPCNLP_ALLOW_CPU: the site's 4 "GPUs" per node
# are GRES without CUDA devices, so the job's CUDA guard is told the CPU is meant.
account: nlp
partition: gpu
cpu_partition: cpu
gpus_per_node: 4
nproc_per_node: 1
cpus_per_task: 1
time: "00:30:00"
env: {NCCL_DEBUG: WARN, HPCNLP_ALLOW_CPU: "1"}
jobs:
  prepare: {cpus_per_task: 1, time: "00:10:00"}
"""


def test_the_quickstart_runs_as_written(site, site_env, tmp_path):
    """docs/quickstart.md's commands, in its order, from a checkout's working dir (jobs/ copied, data/
    linked) with the GPU-shaped profile above as jobs/cluster.yaml: the profile checks, the pipeline dry
    run, prepare on the cpu partition (runs to the end), pretrain's dry run and submit on the gpu partition,
    status and logs of the running job, cancel. Site: partitions cpu and gpu, GRES gpu:4, accounting."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "jobs" / "cluster.yaml").write_text(SITE_PROFILE)
    env = {**site_env, "HPCNLP_STATE_DIR": str(tmp_path / "outputs" / ".slurm")}
    env.pop("HPCNLP_CLUSTER", None)

    def hpcnlp(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [sys.executable, "-m", "hpcnlp", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, f"hpcnlp {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def job_of(res) -> str:
        return re.search(r"submitted job (\d+)", res.stdout).group(1)

    assert "pretrain" in hpcnlp("check", "--config", "jobs/cluster.yaml").stdout
    dry = hpcnlp("pipeline", "--config", "jobs/pipeline.yaml", "--dry-run").stdout
    assert dry.count("sbatch:") >= 5 and "--partition=cpu" in dry and "--partition=gpu" in dry
    prepare = job_of(hpcnlp("submit", "--config", "jobs/prepare.yaml"))
    assert site.job(prepare)["Partition"] == "cpu"
    assert site.wait(prepare, timeout=300) == "COMPLETED", (tmp_path / "outputs" / "logs").glob("*")
    plan = hpcnlp("submit", "--config", "jobs/pretrain.yaml", "--dry-run").stdout
    assert "--gpus-per-node=4" in plan and "--partition=gpu" in plan and "--cpus-per-task=1" in plan
    pretrain = job_of(hpcnlp("submit", "--config", "jobs/pretrain.yaml"))
    assert site.job(pretrain)["Partition"] == "gpu"
    site.wait(pretrain, timeout=120, states={"RUNNING"})
    status = hpcnlp("status", "outputs/pretrain-pydocs").stdout
    assert pretrain in status and ("queued" in status or "running" in status), status
    wait_for_log(site, pretrain, r"launch: .* job \d+ restart 0")
    assert "launch:" in hpcnlp("logs", "outputs/pretrain-pydocs").stdout
    assert pretrain in hpcnlp("cancel", "outputs/pretrain-pydocs").stdout
    assert site.wait(pretrain, timeout=120) == "CANCELLED"
    assert "cancelled" in hpcnlp("status", "outputs/pretrain-pydocs").stdout
