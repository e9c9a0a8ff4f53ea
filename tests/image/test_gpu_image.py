"""The cluster's CUDA image, built here and checked from inside without a GPU: `make image-test-gpu`.

Not in CI (7 GB of CUDA wheels from PyPI, ~15 min): run by hand, results recorded in docs/container.md
("The GPU image, built here"). docker/build-local.sh with HPCNLP_GPU_IMAGE=1 builds docker/Dockerfile as
`make image` does (requirements/lock-cuda.txt from PyPI, DeepSpeed's ops for cuda) on the debootstrap base.
What needs a GPU (CUDA kernels, NCCL collectives, MFU) is not checked here: see the docs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("HPCNLP_TEST_GPU_IMAGE", "localhost/hpcnlp:gpu-test")
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(
        os.environ.get("HPCNLP_GPU_IMAGE_TEST") != "1", reason="builds the CUDA image (7 GB): make image-test-gpu"
    ),
]


def in_image(*args: str, entrypoint: str = "python3", env: tuple = (), timeout: int = 600):
    cmd = [*RUN, "--env", "OMP_NUM_THREADS=1", *(f"--env={e}" for e in env), "--entrypoint", entrypoint, IMAGE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    env = {**os.environ, "HPCNLP_GPU_IMAGE": "1"}
    subprocess.run([str(REPO / "docker" / "build-local.sh"), IMAGE], check=True, cwd=REPO, env=env, timeout=3600)
    return IMAGE


def test_the_stack_imports_and_is_the_cuda_build(image):
    probe = """
import importlib, json, torch
mods = ["transformers", "datasets", "accelerate", "deepspeed", "optimum.onnxruntime", "onnxruntime", "peft",
        "seqeval", "sklearn", "hpcnlp.cli", "hpcnlp.train.harness", "hpcnlp.ship.onnx"]
for m in mods:
    importlib.import_module(m)
import onnxruntime
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": torch.cuda.nccl.version(),
                  "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count(),
                  "ort_providers": onnxruntime.get_available_providers()}))
"""
    r = in_image("-c", probe)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    print(seen)
    assert seen["torch"].startswith("2.13.0+cu13") and seen["cuda"].startswith("13.")
    assert len(seen["nccl"]) == 3 and seen["gpus"] == 0


def test_ds_report_lists_the_prebuilt_ops(image):
    """The ops are built for the cuda accelerator (what a GPU node detects); on this GPU-less machine
    DeepSpeed would fall back to its CPU accelerator, which does not see them: say cuda, as a GPU node does."""
    r = in_image(entrypoint="ds_report", env=("DS_ACCELERATOR=cuda",))
    report = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
    print(report)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"cpu_adam \.+ \[YES\]", report), report


def test_check_accepts_every_shipped_config(image):
    """`hpcnlp check` in the CUDA image, on a node without a GPU: every shipped config is valid there; the
    only refusals name inputs the image does not carry (the labelled data, earlier stages' outputs)."""
    for config in sorted((REPO / "jobs").glob("*.yaml")):
        if config.name == "cluster.yaml":
            continue  # a cluster profile, not a job
        r = in_image("check", "--config", f"jobs/{config.name}", entrypoint="hpcnlp")
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in r.stderr, (config.name, r.stderr[-2000:])
        assert r.returncode == 0 or (
            r.returncode == 2 and errors and all("outputs/" in e or "data/" in e for e in errors)
        ), (config.name, r.stderr[-2000:])


def test_doctor_says_what_the_node_lacks(image):
    r = in_image("doctor", entrypoint="hpcnlp")
    print(r.stdout)
    assert "Traceback" not in r.stdout + r.stderr
    assert "infiniband: none" in r.stdout and re.search(r"CUDA 13\.\d", r.stdout)


def test_size(image):
    r = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True)
    size = int(r.stdout.strip())
    print(f"installed size: {size / 1e9:.2f} GB")
    assert 4e9 < size < 20e9  # the CUDA wheels are there; nothing doubled them
