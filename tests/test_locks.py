"""The pinned files (`make lock`, requirements/*.txt): every package of every lock pinned exactly with the
hashes of its files (pip --require-hashes installs nothing else), the locks agree with each other, and the
login-node lock holds pyproject's base dependencies and nothing of the training stack."""

from __future__ import annotations

import re
import tomllib

import pytest
from helpers import REPO

REQ = REPO / "requirements"
LOCKS = ("lock.txt", "lock-cuda.txt", "submit.txt", "docs.txt", "lint.txt", "dev.txt", "model.txt")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)")


def entries(name: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of every requirement of a compiled lock."""
    out, current = {}, None
    for line in (REQ / name).read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = m.group(1).lower().replace("_", "-")
            out[current] = (m.group(2), [])
        elif line.strip().startswith("--hash=sha256:") and current:
            out[current][1].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif line.strip() and not line.lstrip().startswith("#"):
            assert line.startswith("    "), f"{name}: not a pin: {line!r}"
    return out


def names(path) -> set[str]:
    return {
        PIN.match(line).group(1).lower().replace("_", "-") for line in path.read_text().splitlines() if PIN.match(line)
    }


@pytest.mark.parametrize("lock", LOCKS)
def test_every_package_is_pinned_with_hashes(lock):
    pins = entries(lock)
    assert pins
    for name, (version, hashes) in pins.items():
        assert hashes and all(len(h) == 64 for h in hashes), f"{lock}: {name}=={version} has no hash"


def test_cpu_and_cuda_locks_differ_only_in_torch_and_its_cuda_wheels():
    cpu, cuda = entries("lock.txt"), entries("lock-cuda.txt")
    assert cpu["torch"][0] == "2.13.0+cpu" and cuda["torch"][0] == "2.13.0"
    assert set(cpu["torch"][1]).isdisjoint(cuda["torch"][1])  # the local CPU wheel is not PyPI's
    extra = set(cuda) - set(cpu)
    assert extra and all(n.startswith(("nvidia-", "cuda-")) or n == "triton" for n in extra), extra
    assert not set(cpu) - set(cuda)
    assert {n: v for n, (v, _) in cpu.items() if n != "torch"} == {n: cuda[n][0] for n in cpu if n != "torch"}
    assert cuda["nvidia-nccl-cu13"][0].startswith("2.")  # CUDA 13 wheels: the docs' driver >= 580


def test_login_node_lock_is_the_base_install_at_the_jobs_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~\[; ]", d)[0].lower().replace("_", "-") for d in project["dependencies"]}
    submit, cpu = entries("submit.txt"), entries("lock.txt")
    assert base <= set(submit) and base == names(REQ / "submit.in")
    assert not {"torch", "transformers", "datasets", "tokenizers"} & set(submit)
    assert all(cpu[n][0] == v for n, (v, _) in submit.items()), "submit.txt and lock.txt pin another version"
    assert "torch" in "".join(project["optional-dependencies"]["train"])


def test_every_direct_pin_of_the_inputs_is_in_its_lock():
    for source, lock in (("lock.in", "lock.txt"), ("submit.in", "submit.txt"), ("model.in", "model.txt")):
        pins = entries(lock)
        for line in (REQ / source).read_text().splitlines():
            m = PIN.match(line)
            if m:
                name = m.group(1).lower().replace("_", "-")
                assert pins[name][0].split("+")[0] == m.group(2), (source, name)
