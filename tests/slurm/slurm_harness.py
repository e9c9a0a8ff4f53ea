"""A real Slurm on this machine for tests: munge, slurmctld and N slurmd "nodes" (n1..nN, all on
127.0.0.1, one `slurmd -N nX` each), with a config generated from `hostname -s`.

Everything lives in one directory (config, state, spool, logs, pid files) and uses ports found free
at start, so it does not touch /etc/slurm and can run next to another Slurm. Stopped by pid.

    cluster = LocalSlurm(Path("/tmp/slurm-ci"), nodes=2).start()   # installs Slurm if missing
    job_id = cluster.sbatch(["slurm/pretrain.sbatch", "jobs/x.yaml"], cwd=repo)
    cluster.wait(job_id)  -> "COMPLETED"
    cluster.stop()

Use `cluster.env` (SLURM_CONF set) for your own sbatch/squeue/scontrol calls.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def can_run() -> str | None:
    """None when a local Slurm can be started here; else the reason it cannot."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None if os.geteuid() == 0 else "needs root to start slurmd"
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def install() -> None:
    """apt-get install Slurm and munge when missing (~15 s on Debian 12)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], check=True, env=env)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def slurm_conf(root: Path, host: str, nodes: int, cpus: int, ctld_port: int, node_ports: list[int]) -> str:
    lines = [
        "ClusterName=hpcnlp-ci",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        "MpiDefault=none", "MailProg=/bin/true",
        # No cgroups on this machine (and none needed): plain process tracking.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmctldDebug=info", "SlurmdDebug=info",
        "SlurmctldTimeout=30", "SlurmdTimeout=30",
        "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (there is no sacct here)
        "KillWait=10",
        "SlurmdParameters=config_overrides",
        f"NodeName=n[1-{nodes}] NodeHostname={host} NodeAddr=127.0.0.1 "
        f"Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={cpus} RealMemory=8000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, first_job_id: int = 1):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus_per_node
        # Launchers derive rendezvous ports from job ids: a second cluster on this machine (the image
        # test) starts elsewhere so its jobs do not race the first one's for the same ports.
        self.first_job_id = first_job_id
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._munged_pid: int | None = None  # set only when we started munged

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurm":
        install()
        for d in ("state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]  # `hostname -s`: slurmctld insists on it
        # Consecutive ports for the slurmd nodes (Slurm wants a range), one more for slurmctld.
        base = free_ports(1)[0]
        while not all(_port_free(p) for p in range(base, base + self.nodes + 1)):
            base += self.nodes + 1
        node_ports = list(range(base, base + self.nodes))
        self.conf.write_text(slurm_conf(self.root, host, self.nodes, self.cpus, base + self.nodes, node_ports)
                             + f"FirstJobId={self.first_job_id}\n")
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-c", "-f", str(self.conf)], check=True, env=self.env)
        for i in range(1, self.nodes + 1):
            (self.root / "spool" / f"n{i}").mkdir(exist_ok=True)
            subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", f"n{i}"], check=True, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split()
            if out and set(out) == {"idle"}:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm nodes did not come up in {timeout}s; see {self.root}/log")

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is running already (not ours: we leave it alone)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self._munged_pid = int(Path("/run/munge/munged.pid").read_text())

    def pids(self) -> list[int]:
        out = []
        for f in (self.root / "run").glob("*.pid"):
            try:
                out.append(int(f.read_text()))
            except ValueError:
                pass
        return out

    def stop(self) -> None:
        """Cancel this cluster's jobs (their processes outlive slurmd otherwise), SIGTERM our daemons by
        pid, SIGKILL what is left after 15 s; then munged if it was ours."""
        pids = [p for p in self.pids() if _alive(p)]
        if pids:
            self.run("scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False)
            deadline = time.time() + 20
            while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for p in pids:
            os.kill(p, signal.SIGTERM)
        deadline = time.time() + 15
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        for f in (self.root / "run").glob("*.pid"):
            f.unlink()
        if self._munged_pid and _alive(self._munged_pid):
            os.kill(self._munged_pid, signal.SIGTERM)
            self._munged_pid = None

    # --- using it -----------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), check=check, capture_output=True, text=True, env=kw.pop("env", self.env),
                              **kw)

    def sbatch(self, args: list[str], cwd: str | Path, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=str(cwd), env=env or self.env)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout: float = 300, states=FINAL_STATES) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout}s")

    def start_now(self, job_id: str, timeout: float = 60) -> None:
        """Skip Slurm's delay before a requeued job may start again (BeginTime = now + 120 s).

        Only once the job is PENDING and no node is still completing its previous run: started
        sooner, slurmd refuses the batch script ("Job credential revoked") and the job FAILS.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job_id)
            if state == "RUNNING" or state in FINAL_STATES:
                return  # it restarted by itself (or is over)
            busy = any(t.startswith("comp") for t in self.run("sinfo", "-h", "-o", "%t", check=False).stdout.split())
            if state == "PENDING" and not busy:
                time.sleep(1)  # let slurmd forget the previous run's credential
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                return
            time.sleep(0.5)  # REQUEUED / COMPLETING: the previous run is still being torn down

    def squeue_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
