"""Golden sbatch command lines: `hpcnlp submit`, `pipeline` and `sweep` run for real (in process, through the
command line only) against the fake sbatch of tests/fake_slurm/, for every shipped job config and two
cluster profiles (CPU-only; 4 GPUs per node in an apptainer image). What sbatch was called with is compared
with tests/golden/<profile>/<name>.txt: `#` lines say what was run and what it printed, then per sbatch call
one line per HPCNLP_* variable it saw (`env K=V`) and one line per argv element. Paths are normalised: the
test's tmp dir -> <tmp>, the checkout -> <repo>, the frozen config's content hash -> <hash>.

Regenerate after an intended change, then read the diff:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_submit_golden.py

Hermetic: cwd, state dir, outputs and logs all in tmp (the checkout's jobs/ and data/ are linked in
read-only, as a user's working dir has them); jobs whose inputs an earlier stage writes (a fine-tuned
classifier, an ONNX export) get stand-ins there, a config.json or an empty model.onnx: submit checks
that they exist and what they are, not their weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from hpcnlp.cli import main
from hpcnlp.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
NOT_JOBS = {"cluster", "pipeline", "demo"}  # the profile, and the two pipelines (pipeline.yaml has its own golden)
JOB_CONFIGS = sorted(p.stem for p in (REPO / "jobs").glob("*.yaml") if p.stem not in NOT_JOBS)

PROFILES = {
    "cpu": {"gpus_per_node": 0, "cpus_per_task": 4, "time": "04:00:00"},
    "gpu": {
        "account": "nlp",
        "partition": "gpu",
        "gpus_per_node": 4,
        "cpus_per_task": 32,
        "mem": "256G",
        "container": "apptainer",
        "image": "{tmp}/images/hpcnlp.sif",
        "binds": ["/scratch"],
        "env": {"NCCL_DEBUG": "WARN"},
        "cpu_partition": "cpu",
        "jobs": {"prepare": {"cpus_per_task": 16, "time": "04:00:00"}},
    },
}

# What a shipped config reads that an earlier stage writes (submit checks it is there and what it is).
CLASSIFIER = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "id2label": {"0": "fresh", "1": "rotten"},
    "label2id": {"fresh": 0, "rotten": 1},
}
STAND_INS = {
    "distill": ["outputs/finetune-sentiment"],
    "prune": ["outputs/finetune-sentiment"],
    "self-distill-sentiment": [f"outputs/finetune-sentiment/task-{i}" for i in range(3)],
    "export": ["outputs/distill-sentiment"],
    "validate": ["outputs/distill-sentiment", "outputs/onnx-sentiment/model.onnx"],
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, fake_slurm):
    """A user's working dir in tmp: jobs/ and data/ of the checkout, state and outputs of its own."""
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    (tmp_path / "data").mkdir()
    for item in (REPO / "data").iterdir():  # the shipped samples; never `make data`'s full/ (stand-ins below)
        if item.name != "full":
            (tmp_path / "data" / item.name).symlink_to(item)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "hpcnlp.sif").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "<code>")  # the code version submit records: not this checkout's
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def use_profile(tmp: Path, monkeypatch, profile: str) -> None:
    body = json.loads(json.dumps(PROFILES[profile]).replace("{tmp}", str(tmp)))
    (tmp / f"{profile}.yaml").write_text(yaml.safe_dump(body))
    monkeypatch.setenv("HPCNLP_CLUSTER", str(tmp / f"{profile}.yaml"))


def stand_ins(tmp: Path, job: str) -> None:
    if "kernel-docs" in job:  # what `make data` builds (data/fetch_kernel_docs.py), in miniature
        kernel = tmp / "data" / "full" / "kernel-docs"
        for split in ("train-low", "train", "validation", "test"):
            kernel.mkdir(parents=True, exist_ok=True)
            rows = [
                {"text": f"The {area} subsystem documents its interfaces here.", "label": area}
                for area in ("mm", "bpf")
            ]
            (kernel / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for held, name in (("domain", "mm/a.rst"), ("domain-eval", "bpf/b.rst")):
            (kernel / held / name).parent.mkdir(parents=True)
            (kernel / held / name).write_text("".join(f"{held} paragraph {i} of {name}.\n\n" for i in range(40)))
    for rel in STAND_INS.get(job, []):
        path = tmp / rel
        if path.suffix == ".onnx":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text(json.dumps(CLASSIFIER))
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):  # an ensemble's check reads it
                (path / name).symlink_to(Path(resolve_model_path("minilm-l6")) / name)


def normalise(text: str, tmp: Path) -> str:
    for path, name in sorted(
        {(str(tmp), "<tmp>"), (str(tmp.resolve()), "<tmp>"), (str(REPO), "<repo>")}, key=lambda p: -len(p[0])
    ):
        text = text.replace(path, name)
    text = re.sub(r"/sweep-[\d-]+-\w{6}\.json", "/sweep-<time>-<id>.json", text)
    return re.sub(r"(/configs/[\w-]+?)-[0-9a-f]{12}\.yaml", r"\1-<hash>.yaml", text)


def render(command: list[str], profile: str, out: str, calls: list[dict], tmp: Path) -> str:
    lines = [f"# hpcnlp {shlex.join(command)}    (profile {profile})"]
    lines += [f"# out: {line}" for line in out.splitlines() if "submitted" in line]
    for call in calls:
        lines += ["", *(f"env {k}={v}" for k, v in sorted(call["env"].items())), call["cmd"], *call["argv"]]
    return normalise("\n".join(lines) + "\n", tmp)


def compare(name: str, profile: str, text: str) -> None:
    golden = GOLDEN / profile / f"{name}.txt"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        return
    if not golden.is_file():
        pytest.fail(f"no golden file {golden.relative_to(REPO)}: write it with UPDATE_GOLDEN=1 (then read it)")
    assert text == golden.read_text(), (
        f"sbatch calls differ from {golden.relative_to(REPO)} (UPDATE_GOLDEN=1 rewrites it)"
    )


def run(command: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(command)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def prepare_in(tmp: Path, job: str, capsys) -> None:
    """A shipped pretrain config's corpus prepared into <tmp>/outputs/prepared, by `hpcnlp prepare`
    (seconds): a multi-process pretrain is refused before queueing without it."""
    (tmp / "prepare-first.yaml").write_text(f"job: prepare\ndata_from: jobs/{job}.yaml\n")
    run(["prepare", "--config", "prepare-first.yaml"], capsys)


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("job", JOB_CONFIGS)
def test_submit_golden(job, profile, workdir, fake_slurm, monkeypatch, capsys):
    use_profile(workdir, monkeypatch, profile)
    stand_ins(workdir, job)
    if job.startswith("pretrain"):  # 2 nodes (its batch header) x 1 or 4 processes: a group never tokenizes
        prepare_in(workdir, job, capsys)
        assert fake_slurm.calls() == []  # prepared here, nothing queued
    command = ["submit", "--config", f"jobs/{job}.yaml"]
    out = run(command, capsys)
    calls = fake_slurm.calls("sbatch")
    assert len(calls) == 1 and calls[0]["argv"][0] == "--parsable"
    snapshot = Path(calls[0]["argv"][-1])
    assert snapshot.is_file() and snapshot.is_relative_to(workdir / "state" / "configs")
    assert re.search(r"submit: submitted job 1001, log \S+-1001\.out$", out, re.M), out
    compare(job, profile, render(command, profile, out, calls, workdir))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pipeline_golden_chains_each_stage_after_the_previous(profile, workdir, fake_slurm, monkeypatch, capsys):
    use_profile(workdir, monkeypatch, profile)
    command = ["pipeline", "--config", "jobs/pipeline.yaml"]
    out = run(command, capsys)
    calls = fake_slurm.calls("sbatch")
    assert len(calls) == 6, out
    for i, call in enumerate(calls):
        deps = [a for a in call["argv"] if a.startswith("--dependency=")]
        assert deps == ([f"--dependency=afterok:{1000 + i}"] if i else []), call["argv"]
    compare("pipeline", profile, render(command, profile, out, calls, workdir))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sweep_golden_is_one_array_job(profile, workdir, fake_slurm, monkeypatch, capsys):
    use_profile(workdir, monkeypatch, profile)
    command = [
        "sweep",
        "--config",
        "jobs/finetune-sentiment.yaml",
        "--max-parallel",
        "1",
        "--overrides-list",
        "training.learning_rate=1e-4",
        "training.learning_rate=3e-4 training.seed=7",
    ]
    out = run(command, capsys)
    [call] = fake_slurm.calls("sbatch")
    assert "--array=0-1%1" in call["argv"]
    manifest = json.loads((workdir / "outputs" / "finetune-sentiment" / "sweep.json").read_text())
    assert [t[-1] for t in manifest["tasks"]] == [f"output_dir=outputs/finetune-sentiment/task-{i}" for i in (0, 1)]
    # The array reads its own manifest (never rewritten); sweep.json is the latest's copy, naming it
    own = Path(call["env"]["HPCNLP_SWEEP"])
    assert own.parent == workdir / "outputs" / "finetune-sentiment" and re.fullmatch(
        r"sweep-[\d-]+-\w{6}\.json", own.name
    )
    assert json.loads(own.read_text())["tasks"] == manifest["tasks"] and manifest["manifest"] == own.name
    assert manifest["job_id"] == "1001"
    for i in (0, 1):  # `hpcnlp status` says queued at once
        task = json.loads((workdir / "outputs" / "finetune-sentiment" / f"task-{i}" / "status.json").read_text())
        assert (
            task["state"] == "queued" and task["queued_job_id"] == f"1001_{i}" and task["log"].endswith(f"1001_{i}.out")
        )
    compare("sweep", profile, render(command, profile, out, calls=[call], tmp=workdir))


def test_every_golden_file_has_its_test():
    expected = {f"{p}/{n}.txt" for p in PROFILES for n in [*JOB_CONFIGS, "pipeline", "sweep"]}
    found = {str(p.relative_to(GOLDEN)) for p in GOLDEN.glob("*/*.txt")}
    assert found <= expected, f"stale golden files (no test writes them): {sorted(found - expected)}"


def test_status_asks_squeue_about_the_queued_job(workdir, fake_slurm, monkeypatch, capsys):
    use_profile(workdir, monkeypatch, "cpu")
    run(["submit", "--config", "jobs/finetune-sentiment.yaml"], capsys)
    fake_slurm.set_state("1001", "RUNNING")
    out = run(["status", "outputs/finetune-sentiment"], capsys)
    row = next(line for line in out.splitlines() if line.startswith("| finetune-sentiment"))
    assert [c.strip() for c in row.strip("|").split("|")][:4] == ["finetune-sentiment", "queued", "RUNNING", "1001"]
    assert fake_slurm.calls("squeue")[-1]["argv"] == ["-h", "-t", "all", "-j", "1001", "-o", "%T"]
    fake_slurm.set_state("1001", None)  # Slurm forgot it: squeue and sacct say nothing
    out = run(["status", "outputs/finetune-sentiment"], capsys)
    assert "RUNNING" not in out and [c["cmd"] for c in fake_slurm.calls()][-2:] == ["squeue", "sacct"]


def test_a_refused_sbatch_is_an_error_and_leaves_no_queued_status(workdir, fake_slurm, monkeypatch, capsys):
    use_profile(workdir, monkeypatch, "cpu")
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "Batch job submission failed: Invalid account or account/partition")
    with pytest.raises(SystemExit, match="sbatch refused the job: sbatch: error: Batch job submission failed"):
        main(["submit", "--config", "jobs/finetune-sentiment.yaml"])
    assert len(fake_slurm.calls("sbatch")) == 1
    assert not (workdir / "outputs" / "finetune-sentiment" / "status.json").exists()


def test_the_fake_tools_answer_like_slurm(fake_slurm):
    import subprocess

    def tool(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    assert tool("scontrol", "show", "hostnames", "node[01-03,7],gpu5").split() == [
        "node01",
        "node02",
        "node03",
        "node7",
        "gpu5",
    ]
    assert "NodeAddr=node02" in tool("scontrol", "show", "node", "--oneliner", "node02")
    assert tool("sbatch", "--parsable", __file__).strip() == "1001"
    assert tool("sbatch", __file__).strip() == "Submitted batch job 1002"
    assert tool("squeue", "-h", "-j", "1002", "-o", "%T") == ""
    assert [c["cmd"] for c in fake_slurm.calls()] == ["scontrol", "scontrol", "sbatch", "sbatch", "squeue"]
