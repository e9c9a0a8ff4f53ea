"""Multi-node launch under Slurm: the logic behind slurm/launch.sh, kept out of bash.

Two halves, both standard library only (the head may run them with a bare `python3` when the
training stack lives in a container image):

  plan  (on the batch host, once):  rendezvous (first node's address, a port free and stable for
        the job), the config check command, and the `srun` line that starts ONE task per node,
        wrapped in the container runtime when an image is set. Printed as bash assignments. The step
        is given the allocation's CPUs (--cpus-per-task, and SRUN_CPUS_PER_TASK: since Slurm 22.05 srun
        does not inherit them) and GPUs (hpcnlp.runtime.gres reads every form a job may ask in).
  node  (on every node, inside the container if any): reads that node's own SLURM_NODEID and
        execs torchrun or `accelerate launch` with the right node rank, which start the
        processes of `hpcnlp <job> --config ...`.

Steered by environment variables (see docs/slurm.md):
  HPCNLP_LAUNCHER        torchrun (default) | accelerate
  HPCNLP_NPROC_PER_NODE  processes per node (default: GPUs Slurm gave the node, else 1)
  HPCNLP_IMAGE           container image; unset = run in the current environment (a venv)
  HPCNLP_CONTAINER       apptainer | singularity | pyxis | podman (default: apptainer when an image is set)
  HPCNLP_BIND            extra comma-separated dirs to bind into the container
  HPCNLP_PODMAN_ARGS     extra `podman run` options (e.g. --runtime runc)
  HPCNLP_PASS_ENV        more variable names podman passes in (NCCL_*, UCX_*, FI_*, TORCH_* and proxies always are)
  HPCNLP_MODULES         modules slurm/launch.sh loads first (`module load ...`)
  HPCNLP_PYTHON          python on the nodes (default: this interpreter; `python3` inside a container)
DeepSpeed needs no launcher of its own: `training.deepspeed: jobs/deepspeed/zero2.json` in the job
config makes the Trainer use it under torchrun.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from hpcnlp.runtime import env, gres

LAUNCHERS = ("torchrun", "accelerate")
SHUTDOWN_TIMEOUT_S = 900
CONTAINERS = ("none", "apptainer", "singularity", "pyxis", "podman")
# Variables podman passes into the container: Slurm's, ours, the libraries' switches, proxies.
PODMAN_ENV = (
    "SLURM_*",
    "HPCNLP_*",
    "OMP_NUM_THREADS",
    "HF_*",
    "TRANSFORMERS_OFFLINE",
    "DS_ACCELERATOR",
    "TOKENIZERS_PARALLELISM",
    "CUDA_VISIBLE_DEVICES",
    "NCCL_*",  # the network settings a site tunes: NCCL, UCX, libfabric (docs/container.md, "NCCL")
    "UCX_*",
    "FI_*",
    "TORCH_*",
    "PYTORCH_*",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
IB_DEVICES = "/dev/infiniband"  # uverbs and rdma_cm: what libibverbs opens
PORT_BASE, PORT_SPAN = 20000, 20000  # rendezvous ports live in [20000, 40000)


# slurm/launch.sh could not plan or start the step (scontrol failed, no free port, module load, no
# allocation): the cluster's side, not the config's (2), so `sacct` tells them apart. Nothing ran.
EXIT_LAUNCH = 5


class LaunchError(Exception):
    pass


@dataclass
class Plan:
    job: str
    job_args: list[str]  # --config <file> key=value ...
    nnodes: int
    nproc_per_node: int
    # The rendezvous (rank 0's node); None until the job has its nodes (a dry run's display passes
    # its own description to srun_command instead)
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "torchrun"
    container: str = "none"
    image: str | None = None
    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)
    binds: list[str] = field(default_factory=list)
    podman_args: list[str] = field(default_factory=list)
    gpus: int = 0  # GPUs Slurm gave each node: podman then passes the devices in (CDI)
    # The node has InfiniBand/RoCE devices: podman passes /dev/infiniband in, or NCCL falls back to TCP
    # sockets (Apptainer and pyxis show the host's /dev already).
    ib_devices: bool = False
    pass_env: list[str] = field(default_factory=list)  # more variables podman passes (the profile's env)
    # CPUs of the one task per node: the allocation's cpus-per-task (Slurm >= 22.05: a step does not
    # inherit it, and with task/affinity the node's launcher and all its ranks would share ONE CPU)
    cpus_per_task: int | str | None = None
    gpu_option: str | None = None  # how the step asks for the allocation's GPUs (--gpus-per-node=4, --gres=...)


# --- rendezvous ---------------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As torchrun's store binds: a port in TIME_WAIT from this job's previous run is reusable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def job_port(job_id: str | int, is_free=port_is_free) -> int:
    """A port derived from the job id (the same after every requeue), moved up past busy ones.

    Checked on the batch host, which is the first node: that is where rank 0 listens.
    """
    start = PORT_BASE + int(job_id) % PORT_SPAN
    for i in range(200):
        port = PORT_BASE + (start - PORT_BASE + i) % PORT_SPAN
        if is_free(port):
            return port
    raise LaunchError(f"no free port near {start} on {socket.gethostname()}")


def _scontrol(*args: str) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if proc.returncode != 0:  # its own words, in one line: the batch log says what Slurm said
        said = " ".join((proc.stderr or proc.stdout).split()) or "no output"
        raise LaunchError(f"`scontrol {' '.join(args)}` failed (exit {proc.returncode}): {said}")
    return proc.stdout


def first_node(nodelist: str) -> str:
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise LaunchError(f"scontrol could not expand the node list '{nodelist}'")
    return hosts[0]


def node_address(node: str) -> str:
    """The address Slurm itself uses for a node (NodeAddr): node names need not resolve in DNS."""
    for item in _scontrol("show", "node", "--oneliner", node).split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    return node


# --- command lines ------------------------------------------------------------------------
def node_command(
    launcher: str,
    nnodes: int,
    nproc_per_node: int,
    node_rank: int | str,
    master_addr: str,
    master_port: int | str,
    job: str,
    job_args: list[str],
    python: str = sys.executable,
) -> list[str]:
    """What one node runs: a launcher starting `nproc_per_node` processes of `hpcnlp <job>`. The node rank
    and port are strings where they are not known yet: a dry run shows `$SLURM_NODEID`, `<port>`."""
    target = ["-m", "hpcnlp", job, *job_args]
    if launcher == "torchrun":
        return [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={master_port}",
            "--max-restarts=0",
            # On SIGTERM (preemption, scancel, time limit) torchrun SIGKILLs its ranks after this long, 30 s
            # by default: a checkpoint that takes longer would be cut short by torchrun, whatever the site's
            # GraceTime. Slurm's own SIGKILL ends the step at the real deadline; torchrun waits up to the
            # stall timeout's default (step_timeout_minutes: 15) and only while ranks are still alive.
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
            *target,
        ]
    if launcher == "accelerate":
        # --multi_gpu is accelerate's name for "multi-process DDP"; on CPU it uses gloo. (--cpu would
        # silently start a single process whatever --num_processes says.)
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={nnodes * nproc_per_node}",
            f"--num_machines={nnodes}",
            f"--machine_rank={node_rank}",
            f"--main_process_ip={master_addr}",
            f"--main_process_port={master_port}",
            "--same_network",
            *target,
        ]
    raise LaunchError(f"unknown launcher '{launcher}'; use one of {LAUNCHERS}")


def container_wrap(plan: Plan) -> tuple[list[str], list[str]]:
    """(extra srun options, command prefix) that run a command inside the image on a node."""
    binds = list(dict.fromkeys([plan.workdir, *plan.binds]))  # ordered, unique
    if plan.container == "none":
        return [], []
    if not plan.image:
        raise LaunchError(f"container '{plan.container}' needs an image: set HPCNLP_IMAGE")
    if plan.container in ("apptainer", "singularity"):
        return [], [plan.container, "exec", "--nv", "--bind", ",".join(binds), "--pwd", plan.workdir, plan.image]
    if plan.container == "pyxis":
        return [
            f"--container-image={plan.image}",
            f"--container-mounts={','.join(f'{b}:{b}' for b in binds)}",
            f"--container-workdir={plan.workdir}",
        ], []
    if plan.container == "podman":
        # Host network and IPC: ranks on different nodes reach each other, as outside a container.
        prefix = ["podman", "run", "--rm", "--network=host", "--ipc=host", *plan.podman_args]
        # The image's ENTRYPOINT is `hpcnlp`; what runs here is a python command line. And run as the
        # submitting user, as Apptainer does, so outputs in the bound dirs are theirs (rootless podman
        # needs keep-id for that uid to be the same inside).
        prefix += ["--entrypoint=", f"--user={os.getuid()}:{os.getgid()}"]
        if os.getuid() != 0:
            prefix.append("--userns=keep-id")
        for b in binds:
            prefix += ["-v", f"{b}:{b}"]
        if plan.gpus:  # CDI names all of the node's GPUs; CUDA_VISIBLE_DEVICES (Slurm's) picks the job's
            prefix += ["--device", "nvidia.com/gpu=all"]
        if plan.ib_devices:
            prefix += ["--device", IB_DEVICES]
        # Podman passes no host variable unless named (Apptainer and pyxis pass them all).
        for name in (*PODMAN_ENV, *plan.pass_env):
            prefix.append(f"--env={name}")
        return [], [*prefix, "-w", plan.workdir, plan.image]
    raise LaunchError(f"unknown container runtime '{plan.container}'; use one of {CONTAINERS}")


def rendezvous(plan: Plan) -> str:
    """`address:port` of rank 0's node, as the node half takes it (--master)."""
    if plan.master_addr is None or plan.master_port is None:
        raise LaunchError("no rendezvous yet: the plan has no nodes (plan_from_env makes one inside the job)")
    return f"{plan.master_addr}:{plan.master_port}"


def node_launcher_command(plan: Plan, master: str | None = None) -> list[str]:
    """The per-node half, called with the plan's values; the node rank is filled in on the node.
    `master`: the rendezvous as `address:port`, default the plan's; before the job has nodes (a dry
    run) a description of it, e.g. `<first node>:<port>`."""
    return [
        plan.python,
        "-m",
        "hpcnlp.runtime.launch",
        "node",
        f"--launcher={plan.launcher}",
        f"--nnodes={plan.nnodes}",
        f"--nproc-per-node={plan.nproc_per_node}",
        f"--master={master or rendezvous(plan)}",
        "--",
        plan.job,
        *plan.job_args,
    ]


def srun_command(plan: Plan, master: str | None = None) -> list[str]:
    """One task per node; if any task fails, Slurm kills the others, so the whole step fails.
    `master`: as for node_launcher_command."""
    srun_opts, prefix = container_wrap(plan)
    resources = [
        *([f"--cpus-per-task={plan.cpus_per_task}"] if plan.cpus_per_task else []),
        *([plan.gpu_option] if plan.gpu_option else []),
    ]
    return [
        "srun",
        "--kill-on-bad-exit=1",
        f"--nodes={plan.nnodes}",
        f"--ntasks={plan.nnodes}",
        "--ntasks-per-node=1",
        *resources,
        *srun_opts,
        *prefix,
        *node_launcher_command(plan, master),
    ]


def check_command(plan: Plan) -> list[str]:
    """`hpcnlp check` in the same environment the job will run in (run on the batch host)."""
    check = [plan.python, "-m", "hpcnlp", "check", *plan.job_args]
    srun_opts, prefix = container_wrap(plan)
    if plan.container == "pyxis":  # pyxis only exists inside srun
        return ["srun", "--nodes=1", "--ntasks=1", *srun_opts, *check]
    return [*prefix, *check]


def node_processes(single_process: bool, requested: int) -> int:
    """Processes a node starts: one for jobs that are not data-parallel (their spec says so: N copies
    would race on output_dir), else `requested`."""
    return 1 if single_process else requested


def plan_from_env(job: str, job_args: list[str], single_process: bool = False) -> Plan:
    """The plan inside the allocation; `single_process`: the job runs as one process (its spec says so)."""
    nodelist = env.slurm_nodelist()
    job_id = env.slurm_job_id()
    if not nodelist or not job_id:
        raise LaunchError(
            "not inside a Slurm allocation (no SLURM_JOB_NODELIST); "
            "submit with `sbatch slurm/<job>.sbatch` or `hpcnlp submit`"
        )
    image = env.hpcnlp_setting("IMAGE")
    container = env.hpcnlp_setting("CONTAINER", "apptainer" if image else "none")
    # Single-process jobs are brought down to one process on the node here, and refused on several
    # nodes by `hpcnlp check` (which has the job registry, with the job's stack).
    nproc = node_processes(single_process, int(env.hpcnlp_setting("NPROC_PER_NODE") or env.slurm_gpus_on_node() or 1))
    binds = [b for b in (env.hpcnlp_setting("BIND") or "").split(",") if b]
    gpus = env.slurm_gpus_on_node()
    return Plan(
        job=job,
        job_args=list(job_args),
        nnodes=env.slurm_num_nodes(),
        nproc_per_node=int(nproc),
        master_addr=node_address(first_node(nodelist)),
        master_port=job_port(job_id),
        launcher=env.hpcnlp_setting("LAUNCHER", "torchrun"),
        container=container,
        image=image,
        python=env.hpcnlp_setting("PYTHON", "python3" if container != "none" else sys.executable),
        workdir=env.slurm_submit_dir(),
        binds=binds,
        podman_args=shlex.split(env.hpcnlp_setting("PODMAN_ARGS", "")),
        gpus=gpus,
        ib_devices=os.path.isdir(IB_DEVICES),
        pass_env=(env.hpcnlp_setting("PASS_ENV") or "").split(),
        cpus_per_task=env.slurm_cpus_per_task(),
        gpu_option=gres.step_option(gpus, env.slurm_gpus_per_node_request()),
    )


def sweep_task_args(manifest: str | None, task_id: int | None) -> list[str]:
    """Overrides of this array task, from the manifest `hpcnlp sweep` wrote (HPCNLP_SWEEP)."""
    if not manifest:
        return []
    import json

    tasks = json.loads(open(manifest).read())["tasks"]
    if task_id is None or not 0 <= task_id < len(tasks):
        raise LaunchError(f"{manifest}: no task {task_id} (array task id) among {len(tasks)}")
    return list(tasks[task_id])


def bash_assignments(plan: Plan) -> str:
    q = lambda cmd: " ".join(shlex.quote(c) for c in cmd)  # noqa: E731
    # srun reads SRUN_CPUS_PER_TASK too (22.05+): set for any srun the batch script runs (pyxis' check)
    cpus = [f"export SRUN_CPUS_PER_TASK={shlex.quote(str(plan.cpus_per_task))}"] if plan.cpus_per_task else []
    return (
        "\n".join(
            [
                *cpus,
                f"CHECK=({q(check_command(plan))})",
                f"CMD=({q(srun_command(plan))})",
                f"DESCRIBE={shlex.quote(describe(plan))}",
            ]
        )
        + "\n"
    )


def describe(plan: Plan) -> str:
    where = "bare" if plan.container == "none" else f"{plan.container} {plan.image}"
    return (
        f"{plan.job}: {plan.nnodes} node(s) x {plan.nproc_per_node} process(es), {plan.launcher}, "
        f"rendezvous {rendezvous(plan)}, {where}"
    )


# --- entry points -------------------------------------------------------------------------
def main(argv: list[str] | None = None, single_process: bool = False) -> int:
    """`plan` (slurm/launch.sh, through hpcnlp.cluster.launcher, which knows `single_process` from the
    job's spec) or `node` (each node's srun task)."""
    p = argparse.ArgumentParser(prog="python -m hpcnlp.runtime.launch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="print bash assignments CHECK=(...) CMD=(...) for slurm/launch.sh")
    pp.add_argument("job")
    pp.add_argument("job_args", nargs=argparse.REMAINDER)
    pn = sub.add_parser("node", help="on each node: exec torchrun / accelerate launch with this node's rank")
    pn.add_argument("--launcher", choices=LAUNCHERS, required=True)
    pn.add_argument("--nnodes", type=int, required=True)
    pn.add_argument("--nproc-per-node", type=int, required=True)
    pn.add_argument("--master", required=True, help="address:port of the rendezvous (rank 0's node)")
    pn.add_argument("job")
    pn.add_argument("job_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.cmd == "plan":
            extra = sweep_task_args(env.hpcnlp_setting("SWEEP"), env.slurm_array_task_id())
            sys.stdout.write(bash_assignments(plan_from_env(a.job, [*a.job_args, *extra], single_process)))
            return 0
        addr, port = a.master.rsplit(":", 1)
        cmd = node_command(
            a.launcher,
            a.nnodes,
            a.nproc_per_node,
            env.slurm_node_id(),
            addr,
            int(port),
            a.job,
            a.job_args,
            python=sys.executable,
        )
    except (LaunchError, subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"launch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_LAUNCH
    print(f"launch: node {env.slurm_node_id()} of {a.nnodes} ({socket.gethostname()}): {shlex.join(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
