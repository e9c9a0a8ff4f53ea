"""The container image, built for real and checked from inside: `make image-test` (CI runs it).

No Docker engine here: docker/build-local.sh builds docker/Dockerfile with podman against a Debian
base made by debootstrap, installing from a wheelhouse of requirements/lock.txt (no network in the
build). Needs root, podman, runc and debootstrap (.ci/run installs them). `make test` skips this
module; `make image-test` sets HPCNLP_IMAGE_TEST=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("HPCNLP_TEST_IMAGE", "localhost/hpcnlp:test")
# What `podman run` needs on this kind of host: crun refuses its hybrid cgroups (runc works), and
# podman's default ulimits exceed the hard limits a process without CAP_SYS_RESOURCE may set.
PODMAN_RUN_ARGS = ["--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
VENV_SITE = "/opt/hpcnlp/venv/lib/python3.11/site-packages"
# DeepSpeed ZeRO vs DDP, same seed, 6 fp32 steps: the largest loss difference accepted.
DEEPSPEED_LOSS_TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(
        os.environ.get("HPCNLP_IMAGE_TEST") != "1",
        reason="builds the container image (minutes): run by `make image-test`",
    ),
]


def lock_pins() -> dict[str, str]:
    """name -> version of every `name==version` line of the lock (comments and hashes aside; a local label
    such as torch's +cpu dropped, as pip list's versions are compared without it)."""
    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#\\]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2).split("+")[0]
    return pins


def in_image(
    *args: str, entrypoint: str | None = None, volumes: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = ["podman", "run", "--rm", *PODMAN_RUN_ARGS, "--env", "OMP_NUM_THREADS=1"]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    for host, inside in (volumes or {}).items():
        cmd += ["-v", f"{host}:{inside}"]
    return subprocess.run([*cmd, IMAGE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: apt-get install podman runc debootstrap (see .ci/run)")
    before = _image_id(IMAGE)
    subprocess.run([str(REPO / "docker" / "build-local.sh"), IMAGE], check=True, cwd=REPO, timeout=1800)
    if before and before != _image_id(IMAGE):  # our previous build, untagged now: 2+ GB a run otherwise
        subprocess.run(["podman", "rmi", before], capture_output=True)
    return IMAGE


def _image_id(tag: str) -> str:
    r = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_is_the_cli(image):
    r = in_image()  # no arguments: CMD is --help
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and "check" in r.stdout


def test_check_accepts_the_shipped_pretrain_config(image):
    r = in_image("check", "--config", "jobs/pretrain.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: jobs/pretrain.yaml is a valid 'pretrain' config" in r.stdout


def test_runs_offline_as_non_root_and_cannot_change_its_install(image):
    probe = (
        "import os, json\n"
        "try:\n"
        f"    open('{VENV_SITE}/hpcnlp/evil.py', 'w'); wrote = True\n"
        "except PermissionError:\n"
        "    wrote = False\n"
        "print(json.dumps({'uid': os.getuid(), 'wrote': wrote,"
        " 'offline': os.environ.get('HF_HUB_OFFLINE'),"
        " 'env': sorted(os.environ),"
        " 'pip_cache': os.environ.get('PIP_NO_CACHE_DIR')}))"
    )
    r = in_image("-c", probe, entrypoint="python3")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["uid"] != 0
    assert seen["wrote"] is False
    assert seen["offline"] == "1"
    secrets = [k for k in seen["env"] if re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|KEY)(_|$)", k)]
    assert secrets == []  # (TOKENIZERS_PARALLELISM is fine)
    assert seen["pip_cache"] == "1"


def test_same_python_and_pins_as_make_setup(image):
    """The image's venv holds exactly the lock's versions (torch: the CPU wheel of this build)."""
    r = in_image("-m", "pip", "list", "--format=json", entrypoint="python3")
    assert r.returncode == 0, r.stderr
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(r.stdout)}
    for name, version in lock_pins().items():
        assert installed.get(name, "").split("+")[0] == version, name
    r = in_image("-c", "import sys; print(sys.version_info[:2])", entrypoint="python3")
    assert r.stdout.strip() == "(3, 11)"


def test_labels_and_commit_say_what_the_image_was_built_from(image):
    """OCI labels (version, revision, source, created) and HPCNLP_GIT_COMMIT: the image has no .git, so runs
    inside record the commit from that variable (runtime.env.code_version())."""
    r = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True)
    config = json.loads(r.stdout)[0]["Config"]
    labels = config["Labels"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert labels["org.opencontainers.image.revision"] == commit
    assert labels["org.opencontainers.image.version"] == version
    assert "org.opencontainers.image.source" in labels
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])
    assert labels["org.opencontainers.image.base.name"] == "localhost/hpcnlp-base:bookworm-py311"
    assert re.fullmatch(r"\d{8}T\d{6}Z", labels["io.hpcnlp.base.debian-snapshot"])  # snapshot.debian.org's form
    assert f"HPCNLP_GIT_COMMIT={commit}" in config["Env"]
    r = in_image("/opt/hpcnlp/build-info.txt", entrypoint="cat")
    assert f"revision={commit}" in r.stdout.splitlines()
    r = in_image("-c", "from hpcnlp.runtime import env; print(env.code_version())", entrypoint="python3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == commit  # what runs in the image record (run.json, metrics, bundles)


def test_rdma_userspace_loads(image):
    """libibverbs, librdmacm and the HCA providers (mlx5, efa, ...) load: what NCCL's IB/RoCE transport
    dlopens. Here there is no HCA: the device list is empty, not an error."""
    probe = (
        "import ctypes, glob, json\n"
        "verbs = ctypes.CDLL('libibverbs.so.1'); ctypes.CDLL('librdmacm.so.1')\n"
        "verbs.ibv_get_device_list.restype = ctypes.c_void_p\n"
        "n = ctypes.c_int(-1); verbs.ibv_get_device_list(ctypes.byref(n))\n"
        "print(json.dumps({'devices': n.value,"
        " 'providers': sorted(p.split('/')[-1].split('-')[0] for p in glob.glob('/usr/lib/*/libibverbs/*.so'))}))"
    )
    r = in_image("-c", probe, entrypoint="python3")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["devices"] == 0
    assert {"libmlx5", "libefa", "libbnxt_re"} <= set(seen["providers"])


def test_podman_launcher_passes_the_sites_network_settings(image, tmp_path):
    """The podman line slurm/launch.sh runs (runtime.launch.container_wrap) brings NCCL_*, UCX_* and FI_*
    from the node into the job; nothing else of the host's leaks in."""
    from hpcnlp.runtime import launch

    plan = launch.Plan(
        job="pretrain",
        job_args=[],
        nnodes=1,
        nproc_per_node=1,
        container="podman",
        image=image,
        workdir=str(tmp_path),
        podman_args=PODMAN_RUN_ARGS,
    )
    _, prefix = launch.container_wrap(plan)
    site = {"NCCL_IB_HCA": "mlx5_0:1", "NCCL_SOCKET_IFNAME": "ib0", "UCX_TLS": "rc,sm", "FI_PROVIDER": "efa"}
    r = subprocess.run(
        [*prefix, "env"], env={**os.environ, **site, "SITE_PRIVATE": "x"}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    inside = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert {k: inside.get(k) for k in site} == site
    assert "SITE_PRIVATE" not in inside


def test_deepspeed_ops_are_prebuilt_and_the_image_has_no_compiler(image):
    """CPU Adam (the offload configs' optimizer) and the shm allreduce (multi-process CPU runs) load from
    the deepspeed wheel built in the image's deepspeed-ops stage: nothing compiles at run time, and
    nothing could (no g++ in the image)."""
    probe = (
        "import json, shutil, torch\n"
        "from deepspeed.git_version_info import installed_ops, accelerator_name\n"
        "from deepspeed.ops.adam import DeepSpeedCPUAdam\n"
        "p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)\n"
        "DeepSpeedCPUAdam([p], lr=0.1).step()\n"
        "print(json.dumps({'ops': installed_ops, 'accelerator': accelerator_name,"
        " 'stepped': p.detach().tolist(), 'gxx': shutil.which('g++')}))"
    )
    r = in_image("-c", probe, entrypoint="python3")
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["ops"]["cpu_adam"] and seen["ops"]["deepspeed_shm_comm"], seen["ops"]
    assert seen["accelerator"] == "cpu"
    assert seen["stepped"] == pytest.approx([0.9] * 4, abs=1e-6)  # Adam's first step: lr * sign(grad)
    assert seen["gxx"] is None
    r = in_image("--hide_errors_and_warnings", entrypoint="ds_report")
    assert r.returncode == 0, r.stdout + r.stderr
    report = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)  # ds_report colours its table
    for op in ("cpu_adam", "deepspeed_shm_comm"):  # the "installed" column
        assert re.search(rf"{op} \.+ \[YES\]", report), report


def test_doctor_runs_clean_on_a_node_without_gpus_or_infiniband(image):
    """`hpcnlp doctor` in the image on this GPU-less, IB-less machine: exit 0, and it says so."""
    r = in_image("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "infiniband: none" in r.stdout and "doctor: nothing contradicts" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_model_dir_build_arg_bakes_a_model_in(image):
    """MODEL_DIR (air-gapped clusters): a saved model dir from the build context ends up in the image."""
    from transformers import BertConfig, BertForMaskedLM

    context_dir = REPO / ".tmp-image-model"  # inside the build context, git-ignored
    BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(context_dir / "tiny-bert")
    tag = f"{image}-model"
    try:
        subprocess.run(
            [str(REPO / "docker" / "build-local.sh"), tag, "--build-arg", f"MODEL_DIR={context_dir.name}/tiny-bert"],
            check=True,
            cwd=REPO,
            timeout=900,
        )
    finally:
        shutil.rmtree(context_dir)
    probe = (
        "from transformers import AutoModelForMaskedLM\n"
        "from hpcnlp.models import resolve_model_path\n"
        "print(AutoModelForMaskedLM.from_pretrained(resolve_model_path('/opt/hpcnlp/models/tiny-bert'))"
        ".config.hidden_size)"
    )
    r = subprocess.run(
        ["podman", "run", "--rm", *PODMAN_RUN_ARGS, "--entrypoint", "python3", tag, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
    )
    subprocess.run(["podman", "rmi", tag], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "16"


@pytest.mark.slow
def test_short_pretrain_in_the_image(image, tmp_path):
    """The shipped config on the shipped corpus, 3 steps, outputs written to a mounted dir."""
    tmp_path.chmod(0o777)  # the image's user (uid 10001) writes here
    r = in_image(
        "pretrain",
        "--config",
        "jobs/pretrain.yaml",
        "output_dir=/out/run",
        "data.prepared_root=/out/prepared",
        "data.max_seq_length=64",
        "data.num_proc=1",
        "data.eval_fraction=0.01",
        "training.max_steps=3",
        "head_warmup_steps=1",
        "training.per_device_train_batch_size=8",
        "training.logging_steps=1",
        volumes={str(tmp_path): "/out"},
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert metrics["eval_after"]["loss"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_offload_match_ddp_in_the_image(image, tmp_path):
    """The shipped ZeRO-2 and ZeRO-3-offload configs (CPU Adam, prebuilt) train a tiny BERT with 2 processes
    (torchrun, gloo) inside the image to the losses DDP reaches from the same saved model and seed: same
    batches, same masks, AdamW either way. Dropout is off: it draws from the global RNG, which the DDP
    run's evaluation before training (DeepSpeed runs skip it) moves."""
    from helpers import tiny_bert_without_dropout

    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    for name in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt"):
        shutil.copy(REPO / "data" / "corpus" / "python-docs" / name, work / "corpus")
    tiny_bert_without_dropout(work / "tiny-bert")
    config = {
        "job": "pretrain",
        "model_name_or_path": "/work/tiny-bert",
        "tokenizer_name_or_path": "minilm-l6",
        "data": {
            "train_files": ["/work/corpus/*.rst.txt"],
            "max_seq_length": 32,
            "eval_fraction": 0.1,
            "prepared_root": "/work/prepared",
        },
        "training": {
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_steps": 6,
            "seed": 11,
        },
    }
    (work / "tiny.yaml").write_text(json.dumps(config))  # JSON is YAML
    (work / "prepare.yaml").write_text(json.dumps({"job": "prepare", "data_from": "/work/tiny.yaml"}))
    subprocess.run(["chmod", "-R", "a+rwX", str(work)], check=True)  # the image's user (uid 10001) writes here
    r = in_image("prepare", "--config", "/work/prepare.yaml", volumes={str(work): "/work"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def pretrain(name: str, *overrides: str) -> dict:
        r = in_image(
            *("-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-port", "29500"),
            *("-m", "hpcnlp", "pretrain", "--config", "/work/tiny.yaml", f"output_dir=/work/{name}", *overrides),
            entrypoint="python3",
            volumes={str(work): "/work"},
            timeout=900,
        )
        assert r.returncode == 0, f"{name}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert "Building extension" not in r.stdout + r.stderr  # nothing compiled at run time
        return json.loads((work / name / "metrics.json").read_text())

    ddp = pretrain("ddp")
    for ds in ("zero2", "zero3-offload"):
        m = pretrain(ds, f"training.deepspeed=/opt/hpcnlp/jobs/deepspeed/{ds}.json")
        assert m["world_size"] == 2 and m["global_step"] == 6
        # Measured here (host venv and image): no difference at all; train loss ~10.30, 6 steps of ~0.02.
        assert m["train_loss"] == pytest.approx(ddp["train_loss"], abs=DEEPSPEED_LOSS_TOLERANCE), ds
        assert m["eval_after"]["loss"] == pytest.approx(ddp["eval_after"]["loss"], abs=DEEPSPEED_LOSS_TOLERANCE), ds


@pytest.mark.slow
def test_two_node_slurm_job_trains_inside_the_image(image, tmp_path):
    """slurm/pretrain.sbatch on a real local Slurm (2 slurmd nodes), each node's task in podman."""
    sys.path.insert(0, str(REPO / "tests" / "slurm"))
    from slurm_harness import LocalSlurm, can_run

    if reason := can_run():
        pytest.skip(f"no local Slurm: {reason}")
    work = tmp_path / "work"  # the submit dir: the launcher binds it into the containers
    (work / "corpus").mkdir(parents=True)
    for name in ("tutorial/introduction.rst.txt", "tutorial/controlflow.rst.txt"):
        shutil.copy(REPO / "data" / "corpus" / "python-docs" / name, work / "corpus")
    config = work / "tiny.yaml"  # the packaged MiniLM, short blocks: 2 ranks on 2 shared cores
    config.write_text(
        json.dumps(
            {
                "job": "pretrain",
                "model_name_or_path": "minilm-l6",
                "output_dir": str(work / "out"),
                "data": {
                    "train_files": [str(work / "corpus" / "*.rst.txt")],
                    "max_seq_length": 32,
                    "eval_fraction": 0.05,
                    "prepared_root": str(work / "prepared"),
                },
                "training": {
                    "max_steps": 6,
                    "per_device_train_batch_size": 8,
                    "logging_steps": 2,
                    "eval_strategy": "no",
                    "save_steps": 3,
                    "seed": 7,
                },
            }
        )
    )  # JSON is YAML
    # A process group never tokenizes: prepare first (here with the host's venv; the fingerprint is the
    # files' and the tokenizer's content, so the image's ranks find it), as jobs/pipeline.yaml does.
    (work / "prepare.yaml").write_text(json.dumps({"job": "prepare", "data_from": str(config)}))
    subprocess.run(
        [str(REPO / ".venv" / "bin" / "hpcnlp"), "prepare", "--config", str(work / "prepare.yaml")],
        check=True,
        cwd=work,
    )
    cluster = LocalSlurm(tmp_path / "slurm", nodes=2, first_job_id=7001).start()
    try:
        env = {
            **cluster.env,
            "HPCNLP_HOME": str(REPO),
            "HPCNLP_IMAGE": image,
            "HPCNLP_CONTAINER": "podman",
            "HPCNLP_PODMAN_ARGS": " ".join(PODMAN_RUN_ARGS),
            "OMP_NUM_THREADS": "1",
        }
        job = cluster.sbatch(
            [
                "--nodes=2",
                "--cpus-per-task=1",
                "--time=15",
                f"--output={work}/%x-%j.out",
                str(REPO / "slurm" / "pretrain.sbatch"),
                str(config),
            ],
            cwd=work,
            env=env,
        )
        state = cluster.wait(job, timeout=900)
        log = "\n".join(p.read_text() for p in work.glob("*.out"))
    finally:
        cluster.stop()
    assert state == "COMPLETED", log[:3000] + "\n...\n" + log[-3000:]
    assert f"podman {image}" in log  # the launcher's plan
    for node in (0, 1):  # each node's launcher ran the image's python, not the host venv
        assert re.search(rf"launch: node {node} of 2 .*: /opt/hpcnlp/venv/bin/python3? -m torch.distributed", log)
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 6
    assert metrics["slurm_job_id"] == job
    assert (work / "out").stat().st_uid == os.getuid()  # written as the submitting user


@pytest.mark.slow
def test_whole_chain_in_the_image_and_the_bundle_runs_without_hpcnlp(image, tmp_path):
    """`make demo`'s pipeline (pretrain -> finetune -> distill -> export -> validate) inside the image, then
    `hpcnlp verify` there; outside, `sha256sum -c SHA256SUMS` and the bundle's onnx_inference.py in a
    fresh venv holding only onnxruntime, tokenizers and numpy give the labels the image's run gives."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "jobs", work / "jobs")
    for part in ("corpus", "classification", "ner"):
        shutil.copytree(REPO / "data" / part, work / "data" / part)
    subprocess.run(["chmod", "-R", "a+rwX", str(work)], check=True)  # the image's user (uid 10001) writes here
    run = [
        "podman",
        "run",
        "--rm",
        *PODMAN_RUN_ARGS,
        "--env",
        "OMP_NUM_THREADS=1",
        "-v",
        f"{work}:/work",
        "--workdir",
        "/work",
        IMAGE,
    ]
    r = subprocess.run(
        [*run, "pipeline", "--config", "jobs/demo.yaml", "--local"], capture_output=True, text=True, timeout=1500
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    bundle = work / "outputs" / "demo" / "artifacts" / "sentiment-demo" / "demo"
    assert json.loads((bundle / "validation.json").read_text())["passed"] is True
    r = subprocess.run([*run, "verify", "outputs/demo/artifacts/sentiment-demo/demo"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle).returncode == 0

    texts = ["a gripping, beautifully acted film", "a tedious, overlong mess", "", "🎬 映画 فيلم"]
    r = subprocess.run(
        [
            *run.copy()[:-1],
            "--entrypoint",
            "python",
            IMAGE,
            "outputs/demo/artifacts/sentiment-demo/demo/onnx_inference.py",
            "outputs/demo/artifacts/sentiment-demo/demo",
            *texts,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    in_image_labels = [json.loads(line)["label"] for line in r.stdout.splitlines()]

    venv = tmp_path / "deployer"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [
        f"{name}=={version}"
        for name, version in lock_pins().items()
        if name
        in (
            "onnxruntime",
            "tokenizers",
            "numpy",
            "flatbuffers",
            "packaging",
            "protobuf",
            "sympy",
            "mpmath",
            "coloredlogs",
            "humanfriendly",
            "huggingface-hub",
            "filelock",
            "fsspec",
            "pyyaml",
            "requests",
            "tqdm",
            "typing-extensions",
            "certifi",
            "charset-normalizer",
            "idna",
            "urllib3",
            "hf-xet",
        )
    ]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], check=True, timeout=600)
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.lower()
    assert "torch==" not in listed and "transformers==" not in listed and "hpcnlp" not in listed
    r = subprocess.run(
        [str(venv / "bin" / "python"), str(bundle / "onnx_inference.py"), str(bundle), *texts],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["label"] for line in r.stdout.splitlines()] == in_image_labels
