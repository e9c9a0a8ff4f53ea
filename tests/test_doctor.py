"""`hpcnlp doctor`: each mismatch it must catch (fake /sys tree, fake Slurm variables, a built Node), and one
real run on this GPU-less, InfiniBand-less machine, which must say so and exit 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

from hpcnlp.cluster import doctor
from hpcnlp.cluster.doctor import EXIT_MISMATCH, Node, gather, infiniband, mismatches, nccl_transport


def fake_ib(root, device="mlx5_0", state="4: ACTIVE", layer="InfiniBand"):
    port = root / "sys" / "class" / "infiniband" / device / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text(state + "\n")
    (port / "link_layer").write_text(layer + "\n")


def test_a_consistent_gpu_node_has_no_mismatch():
    node = Node(gpus_allocated=4, in_allocation=True, gpus_seen=4, seen_by="torch", driver="580.65.06", cuda="13.0")
    node.cpus, node.cpus_allocated = 32, 32
    assert mismatches(node) == []


def test_gpus_allocated_but_not_seen():
    node = Node(gpus_allocated=4, in_allocation=True, gpus_seen=0, seen_by="torch", driver="580.65.06", cuda="13.0")
    [line] = mismatches(node)
    assert "allocated 4 GPUs, torch sees 0" in line


def test_driver_too_old_for_the_wheels_cuda():
    node = Node(gpus_seen=1, seen_by="torch", driver="570.124.06", cuda="13.0")
    [line] = mismatches(node)
    assert "driver 570.124.06" in line and "580 or newer" in line
    assert mismatches(Node(gpus_seen=1, seen_by="torch", driver="570.124.06", cuda="12.8")) == []


@pytest.mark.parametrize(("cpus", "word"), [(4, "smaller"), (64, "larger")])
def test_affinity_other_than_allocated(cpus, word):
    node = Node(in_allocation=True)
    node.cpus, node.cpus_allocated = cpus, 16
    [line] = mismatches(node)
    assert f"is {word} than the allocation (16)" in line


def test_gather_reads_the_allocation_and_the_sys_tree(tmp_path, monkeypatch):
    fake_ib(tmp_path, "mlx5_0")
    fake_ib(tmp_path, "mlx5_1", state="1: DOWN", layer="Ethernet")
    for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_GPUS_ON_NODE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(len(os.sched_getaffinity(0))))
    node = gather(root=tmp_path, allreduce=False)
    assert node.gpus_allocated == 2 and node.in_allocation
    assert node.ib_devices == {"mlx5_0": ["port 1: ACTIVE (InfiniBand)"], "mlx5_1": ["port 1: DOWN (Ethernet)"]}
    assert node.cpus_allocated == node.cpus
    # This machine has no GPU: the allocation's 2 are not seen, the only mismatch.
    [line] = mismatches(node)
    assert "allocated 2 GPUs" in line


def test_no_infiniband_dir_is_none(tmp_path):
    assert infiniband(tmp_path) == {}


def test_nccl_network_read_from_its_debug_log():
    assert nccl_transport("host:1:1 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB ib0:10.0.0.1<0>") == "IB"
    assert nccl_transport("host:1:1 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>") == "Socket"
    assert nccl_transport("NCCL INFO Bootstrap : Using eth0") is None


def test_a_failed_allreduce_is_a_mismatch(monkeypatch):
    node = Node(gpus_seen=2, seen_by="torch")
    node.nccl_why_not = "the all-reduce failed: NCCL error"
    assert mismatches(node) == ["NCCL: the all-reduce failed: NCCL error"]


def test_main_exits_nonzero_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather", lambda allreduce: Node(gpus_allocated=1, in_allocation=True))
    assert doctor.main(type("A", (), {"no_allreduce": True})()) == EXIT_MISMATCH
    assert "mismatch: Slurm allocated 1 GPUs" in capsys.readouterr().err


def test_doctor_here_says_no_gpu_no_infiniband_and_exits_0():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO / "src")
    r = subprocess.run([sys.executable, "-m", "hpcnlp", "doctor"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gpus: 0 seen by torch, not in a Slurm allocation" in r.stdout
    assert "infiniband: none" in r.stdout
    assert "not measured (fewer than 2 GPUs seen by torch)" in r.stdout
    assert "doctor: nothing contradicts" in r.stdout
