"""`hpcnlp doctor`: on a node (inside an allocation: `srun hpcnlp doctor`, or in the image), what a job would
get there: GPUs torch sees against those Slurm allocated, the NVIDIA driver against the CUDA of torch's
wheels, NCCL's version and network (InfiniBand or sockets), the CPUs the process may run on against those
allocated. Exit 0: nothing contradicts; EXIT_MISMATCH (1): a job would not get what it asked for (each
mismatch one line, with the fix). No GPU, no InfiniBand, no allocation: said, and not a mismatch.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcnlp.runtime import env, gres

EXIT_MISMATCH = 1
# The oldest driver each CUDA major of torch's wheels runs on (NVIDIA's CUDA compatibility table).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}


@dataclass
class Node:
    """What `gather` found; a test builds one directly."""

    gpus_allocated: int = 0  # Slurm's allocation on this node (hpcnlp.runtime.gres, as the launcher reads it)
    in_allocation: bool = False
    gpus_seen: int | None = None  # torch.cuda.device_count(), else nvidia-smi's count; None: neither is here
    seen_by: str = "nothing"  # "torch" or "nvidia-smi"
    driver: str | None = None  # nvidia-smi's driver version
    cuda: str | None = None  # torch.version.cuda: the CUDA of torch's wheels; None: a CPU build or no torch
    torch: str | None = None
    nccl: str | None = None
    ib_devices: dict[str, list[str]] = field(default_factory=dict)  # device -> "port 1: ACTIVE (InfiniBand)"
    cpus: int = 0  # len(os.sched_getaffinity(0))
    cpus_allocated: int | None = None  # SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE
    nccl_net: str | None = None  # "IB" or "Socket" from a 2-rank all-reduce; None: not run
    nccl_why_not: str | None = None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="on a node: GPUs seen vs allocated, driver vs CUDA, NCCL, InfiniBand, CPU affinity (exit 1: a mismatch)",
    )
    p.add_argument("--no-allreduce", action="store_true", help="skip the 2-rank NCCL all-reduce (with >= 2 GPUs)")


def main(args: argparse.Namespace) -> int:
    node = gather(allreduce=not args.no_allreduce)
    for line in describe(node):
        print(line)
    problems = mismatches(node)
    for line in problems:
        print(f"mismatch: {line}", file=sys.stderr)
    print("doctor: " + (f"{len(problems)} mismatch(es)" if problems else "nothing contradicts"))
    return EXIT_MISMATCH if problems else 0


def gather(root: Path = Path("/"), allreduce: bool = True) -> Node:
    """Everything doctor reports: the allocation as the launcher reads it (hpcnlp.runtime.env), torch,
    nvidia-smi, and /sys under `root`."""
    node = Node(gpus_allocated=env.slurm_gpus_on_node(), in_allocation=env.in_allocation())
    node.driver, smi_gpus = nvidia_smi()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        node.torch, node.cuda = torch.__version__, torch.version.cuda
        node.gpus_seen, node.seen_by = torch.cuda.device_count(), "torch"
        if node.cuda and torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
            version = torch.cuda.nccl.version()  # (2, 29, 7); an int in old releases
            node.nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    elif smi_gpus is not None:
        node.gpus_seen, node.seen_by = smi_gpus, "nvidia-smi"
    node.ib_devices = infiniband(root)
    node.cpus = len(os.sched_getaffinity(0))
    node.cpus_allocated = env.slurm_cpus_per_task()
    if node.torch is None:
        node.nccl_why_not = "no torch here"
    elif (node.gpus_seen or 0) < 2:
        node.nccl_why_not = "fewer than 2 GPUs seen by torch"
    elif not allreduce:
        node.nccl_why_not = "--no-allreduce"
    else:
        node.nccl_net, node.nccl_why_not = nccl_network()
    return node


def nvidia_smi() -> tuple[str | None, int | None]:
    """(driver version, GPU count) from nvidia-smi; (None, None) without it or when it fails."""
    versions, _ = gres.nvidia_smi()
    return (versions[0], len(versions)) if versions else (None, None)


def infiniband(root: Path) -> dict[str, list[str]]:
    """RDMA devices of /sys/class/infiniband (InfiniBand, or RoCE on Ethernet) with their ports' states."""
    base = root / "sys" / "class" / "infiniband"
    out = {}
    for dev in sorted(base.iterdir()) if base.is_dir() else []:
        ports = []
        for port in sorted((dev / "ports").iterdir()) if (dev / "ports").is_dir() else []:
            state = _read(port / "state") or "unknown"  # "4: ACTIVE"
            layer = _read(port / "link_layer") or "unknown"
            ports.append(f"port {port.name}: {state.split(':')[-1].strip()} ({layer})")
        out[dev.name] = ports
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def nccl_transport(log: str) -> str | None:
    """The network NCCL chose, from its NCCL_DEBUG=INFO lines: "IB" (NET/IB) or "Socket" (NET/Socket)."""
    for net in ("IB", "Socket"):
        if re.search(rf"NET/{net}\b", log):
            return net
    return None


def nccl_network(timeout: int = 120) -> tuple[str | None, str | None]:
    """(network, None) from a 2-rank NCCL all-reduce on this node's first two GPUs, or (None, why not)."""
    environ = {**os.environ, "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
    cmd = [sys.executable, "-m", "hpcnlp.cluster.doctor", "--allreduce-ranks", "2", "--port", str(_free_port())]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the all-reduce hung for {timeout} s"
    net = nccl_transport(res.stdout + res.stderr)
    if res.returncode != 0:
        return net, f"the all-reduce failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    return net, None if net else "NCCL named no network"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_rank(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    assert t.item() == world
    dist.destroy_process_group()


def describe(node: Node) -> list[str]:
    alloc = f"{node.gpus_allocated} allocated" if node.in_allocation else "not in a Slurm allocation"
    seen = f"{node.gpus_seen} seen by {node.seen_by}" if node.gpus_seen is not None else "no torch, no nvidia-smi"
    ib = "; ".join(f"{d} ({', '.join(p) or 'no ports'})" for d, p in node.ib_devices.items()) or "none"
    cpus = f", {node.cpus_allocated} allocated" if node.cpus_allocated is not None else ""
    return [
        f"gpus: {seen}, {alloc}",
        f"driver: {node.driver or 'none (no nvidia-smi)'}; torch {node.torch or 'not installed'}, "
        f"CUDA {node.cuda or 'none (CPU build)' if node.torch else '-'}",
        f"nccl: {node.nccl or 'none'}",
        f"infiniband: {ib}",
        "nccl network: "
        + (f"NET/{node.nccl_net}" if node.nccl_net else "not measured")
        + (f" ({node.nccl_why_not})" if node.nccl_why_not else ""),
        f"cpus: {node.cpus} in this process's affinity{cpus}",
    ]


def mismatches(node: Node) -> list[str]:
    """One line per contradiction a job would run into, each with what to do."""
    out = []
    seen = node.gpus_seen or 0
    if node.gpus_allocated and seen < node.gpus_allocated:
        out.append(
            f"Slurm allocated {node.gpus_allocated} GPUs, {node.seen_by} sees {seen}: the job would train on fewer "
            "(or refuse); check the container's GPU flags (--nv, CDI), CUDA_VISIBLE_DEVICES and the driver"
        )
    needed = driver_needed(node.cuda)
    if needed and node.driver and _major(node.driver) < needed:
        out.append(
            f"driver {node.driver} is older than CUDA {node.cuda} of torch's wheels needs ({needed} or newer): "
            "torch sees no GPU; use nodes with a newer driver"
        )
    if node.cpus_allocated is not None and node.cpus != node.cpus_allocated:
        which = "smaller" if node.cpus < node.cpus_allocated else "larger"
        out.append(
            f"CPU affinity ({node.cpus}) is {which} than the allocation ({node.cpus_allocated}): "
            + (
                "run the step with --cpus-per-task (the launcher does; Slurm >= 22.05 srun does not inherit it)"
                if which == "smaller"
                else "the process may run on CPUs other jobs were given; check the task/affinity or cgroup plugin"
            )
        )
    if node.nccl_net is None and node.nccl_why_not and node.nccl_why_not.startswith("the all-reduce"):
        out.append(f"NCCL: {node.nccl_why_not}")
    return out


def driver_needed(cuda: str | None) -> int | None:
    if not cuda:
        return None
    return MIN_DRIVER.get(_major(cuda))


def _major(version: str) -> int:
    head = version.split(".", maxsplit=1)[0]
    return int(head) if head.isdigit() else 0


if __name__ == "__main__":  # the all-reduce's ranks (nccl_network runs this module)
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser()
    parser.add_argument("--allreduce-ranks", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    a = parser.parse_args()
    mp.spawn(_allreduce_rank, args=(a.allreduce_ranks, a.port), nprocs=a.allreduce_ranks)
