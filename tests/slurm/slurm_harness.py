"""A real Slurm on this machine for tests: a munged of its own, slurmctld and N slurmd "nodes" (n1..nN, all on
127.0.0.1, one `slurmd -N nX` each), with a config generated from `hostname -s`.

Everything lives in one directory (config, state, spool, logs, pid files) and uses ports found free
at start, so it does not touch /etc/slurm and can run next to another Slurm. Stopped by pid.

    cluster = LocalSlurm(Path("/tmp/slurm-ci"), nodes=2).start()   # installs Slurm if missing
    job_id = cluster.sbatch(["slurm/pretrain.sbatch", "jobs/x.yaml"], cwd=repo)
    cluster.wait(job_id)  -> "COMPLETED"
    cluster.stop()

Use `cluster.env` (SLURM_CONF set) for your own sbatch/squeue/scontrol calls.

`site=True` makes it look like a production GPU site (tests/slurm/test_production_site.py, docs/reliability.md
"The test site"): task/affinity binding, 4 fake GPUs per node as GRES, partitions `cpu` (default),
`gpu` (preemptable, GraceTime) and `gpu-high` (higher PriorityTier) with partition-priority
preemption by requeue, and accounting through slurmdbd into a MariaDB the harness runs in its own
directory (own port and socket), with a cluster, accounts, a QOS and the user added by sacctmgr.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SITE_APT_PACKAGES = ["slurmdbd", "mariadb-server"]  # accounting (site=True)
SITE_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "sacctmgr")
# site=True: the accounts and QOS sacctmgr creates; the submitting user gets all (default: the first)
SITE_ACCOUNTS = ("nlp", "vision")
SITE_QOS = {"high": 100}  # name: Priority
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def can_run() -> str | None:
    """None when a local Slurm can be started here; else the reason it cannot."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None if os.geteuid() == 0 else "needs root to start slurmd"
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _which(b: str) -> bool:
    return bool(shutil.which(b) or shutil.which(b, path="/usr/sbin:/usr/bin:/sbin:/bin"))


def install(site: bool = False) -> None:
    """apt-get install Slurm and munge when missing (~15 s on Debian 12); with `site`, slurmdbd and
    MariaDB too (~30 s more). The MariaDB service is not started: the harness runs its own."""
    packages = [] if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")) else APT_PACKAGES
    if site and not all(_which(b) for b in SITE_BINARIES):
        packages = [*packages, *SITE_APT_PACKAGES]
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)


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


def slurm_conf(
    root: Path, host: str, nodes: int, cpus: int, ctld_port: int, node_ports: list[int], dbd_port: int | None = None
) -> str:
    """The friendly cluster's slurm.conf; with `dbd_port`, the production-like site's (see `site_lines`)."""
    site = dbd_port is not None
    lines = [
        "ClusterName=hpcnlp-site" if site else "ClusterName=hpcnlp-ci",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket(root)}",  # the cluster's own munged (see LocalSlurm._start_munge)
        "MpiDefault=none",
        "MailProg=/bin/true",
        # Plain process tracking: no cgroup confinement (see site_lines for why not even on the site).
        "ProctrackType=proctrack/linuxproc",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (the friendly one has no sacct)
        "KillWait=10",
        # N nodes each claiming this machine's cores: slurmd accepts the config, not the hardware count.
        "SlurmdParameters=config_overrides",
    ]
    if not site:
        lines += [
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName=n[1-{nodes}] NodeHostname={host} NodeAddr=127.0.0.1 "
            f"Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={cpus} RealMemory=8000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
    else:
        lines += site_lines(host, nodes, cpus, node_ports, dbd_port)
        # The munge socket for the connection to slurmdbd (Slurm's name for it; AuthInfo does not cover it).
        lines.append(f"AccountingStoragePass={munge_socket(root)}")
    return "\n".join(lines) + "\n"


SITE_GPUS = 4  # fake GPUs per node
SITE_GRACE = 60  # seconds between the preemption's SIGTERM and its SIGKILL in the preemptable partitions


def site_lines(host: str, nodes: int, cpus: int, node_ports: list[int], dbd_port: int) -> list[str]:
    """What makes the site look like production (docs/reliability.md, "The test site").

    Not here, and why: task/cgroup and proctrack/cgroup (confinement). This machine is a container
    with a hybrid cgroup v1 tree (cpuset, memory, devices... mounted by its runtime; our processes sit
    in the runtime's memory cgroup), and any other LocalSlurm on it has nodes with the same names:
    slurmd's cgroup/v1 plugin builds its job hierarchy from fixed names under those shared mounts, so
    two clusters would create and clean up each other's cgroups. Not attempted, for that reason: the
    binding (task/affinity) is what is tested, and confinement is left to a real site.
    """
    return [
        # Tasks bound to the CPUs Slurm gave them (sched_setaffinity): a rank sees only its cores.
        "TaskPlugin=task/affinity",
        # Fake GPUs: 4 per node, GRES with device files (gres.conf), no NVML autodetection.
        "GresTypes=gpu",
        # Partition-priority preemption: a job in a higher PriorityTier partition requeues the jobs of
        # lower tiers that hold the resources it needs (SIGTERM, GraceTime, SIGKILL, requeue).
        "PreemptType=preempt/partition_prio",
        "PreemptMode=REQUEUE",
        # Accounting: slurmdbd into MariaDB; jobs need a valid account/association and QOS.
        "AccountingStorageType=accounting_storage/slurmdbd",
        "AccountingStorageHost=127.0.0.1",
        f"AccountingStoragePort={dbd_port}",
        "AccountingStorageEnforce=associations,limits,qos",
        "AccountingStorageTRES=gres/gpu",
        "JobAcctGatherType=jobacct_gather/linux",
        "JobAcctGatherFrequency=10",
        f"NodeName=n[1-{nodes}] NodeHostname={host} NodeAddr=127.0.0.1 "
        f"Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={cpus} RealMemory=8000 Gres=gpu:{SITE_GPUS} State=UNKNOWN",
        "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
        f"PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={SITE_GRACE}",
        "PartitionName=gpu-high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
    ]


def gres_conf(root: Path, nodes: int) -> str:
    """4 fake GPUs per node: device files the harness makes (character devices like /dev/null, 1:3),
    named as NVIDIA's are so Slurm numbers them 0..3 (CUDA_VISIBLE_DEVICES); no NVML (AutoDetect=off)."""
    return f"AutoDetect=off\nNodeName=n[1-{nodes}] Name=gpu File={root}/dev/nvidia[0-{SITE_GPUS - 1}]\n"


def munge_socket(root: Path) -> Path:
    return Path(root) / "munge" / "munge.socket"


def slurmdbd_conf(root: Path, dbd_port: int, db_port: int) -> str:
    return (
        "\n".join(
            [
                "AuthType=auth/munge",
                f"AuthInfo=socket={munge_socket(root)}",
                "DbdHost=localhost",
                "DbdAddr=127.0.0.1",
                f"DbdPort={dbd_port}",
                "SlurmUser=root",
                f"PidFile={root}/run/slurmdbd.pid",
                f"LogFile={root}/log/slurmdbd.log",
                "DebugLevel=info",
                "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1",
                f"StoragePort={db_port}",
                "StorageUser=slurm",
                "StoragePass=slurm",
                "StorageLoc=slurm_acct_db",
            ]
        )
        + "\n"
    )


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, first_job_id: int = 1, site: bool = False):
        self.root = Path(root)
        self.site = site
        self.nodes = nodes
        self.cpus = cpus_per_node
        # Launchers derive rendezvous ports from job ids: a second cluster on this machine (the image
        # test) starts elsewhere so its jobs do not race the first one's for the same ports.
        self.first_job_id = first_job_id
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LocalSlurm:
        install(self.site)
        for d in ("state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]  # `hostname -s`: slurmctld insists on it
        # Consecutive ports for the slurmd nodes (Slurm wants a range), one more for slurmctld.
        base = free_ports(1)[0]
        while not all(_port_free(p) for p in range(base, base + self.nodes + 1)):
            base += self.nodes + 1
        node_ports = list(range(base, base + self.nodes))
        dbd_port = db_port = None
        if self.site:
            dbd_port, db_port = free_ports(2)
        self.conf.write_text(
            slurm_conf(self.root, host, self.nodes, self.cpus, base + self.nodes, node_ports, dbd_port)
            + f"FirstJobId={self.first_job_id}\n"
        )
        self._start_munge()
        if self.site:
            (self.root / "gres.conf").write_text(gres_conf(self.root, self.nodes))
            self._start_accounting(dbd_port, db_port)
            self._add_associations()
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

    def _start_accounting(self, dbd_port: int, db_port: int, timeout: float = 60) -> None:
        """MariaDB (own datadir, socket, port; as root) with the accounting database, then slurmdbd."""
        dev = self.root / "dev"  # the fake GPUs' device files (gres.conf)
        dev.mkdir(exist_ok=True)
        for i in range(SITE_GPUS):
            if not (dev / f"nvidia{i}").exists():
                os.mknod(dev / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        db, sock = self.root / "mysql", self.root / "run" / "mysqld.sock"
        if not (db / "mysql").is_dir():
            subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={db}",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                check=True,
                capture_output=True,
            )
        with open(self.root / "log" / "mariadbd.out", "ab") as out:
            subprocess.Popen(
                [
                    "/usr/sbin/mariadbd",
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={db}",
                    f"--socket={sock}",
                    f"--port={db_port}",
                    "--bind-address=127.0.0.1",
                    f"--pid-file={self.root}/run/mariadbd.pid",
                    f"--log-error={self.root}/log/mariadbd.log",
                    "--skip-name-resolve",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=32M",
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        sql = (
            "CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        self._until(
            lambda: (
                subprocess.run(
                    ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", sql], capture_output=True
                ).returncode
                == 0
            ),
            timeout,
            "MariaDB",
        )
        # slurmdbd reads slurmdbd.conf next to $SLURM_CONF; it must be private to SlurmUser.
        conf = self.root / "slurmdbd.conf"
        conf.write_text(slurmdbd_conf(self.root, dbd_port, db_port))
        conf.chmod(0o600)
        subprocess.run(["/usr/sbin/slurmdbd"], check=True, env=self.env)

        def dbd_answers() -> bool:
            try:
                return self.run("sacctmgr", "-n", "list", "cluster", check=False, timeout=20).returncode == 0
            except subprocess.TimeoutExpired:
                return False

        self._until(dbd_answers, timeout, "slurmdbd")

    def _add_associations(self) -> None:
        """The cluster (before slurmctld registers), accounts, a QOS and this user in every account."""
        user = pwd.getpwuid(os.getuid()).pw_name
        sacctmgr = ("sacctmgr", "-i")
        self.run(*sacctmgr, "add", "cluster", "hpcnlp-site")
        for qos, priority in SITE_QOS.items():
            self.run(*sacctmgr, "add", "qos", qos, f"Priority={priority}")
        self.run(
            *sacctmgr,
            "add",
            "account",
            ",".join(SITE_ACCOUNTS),
            "Cluster=hpcnlp-site",
            "Description=hpcnlp tests",
            "Organization=hpcnlp",
        )
        self.run(
            *sacctmgr,
            "add",
            "user",
            user,
            f"Account={','.join(SITE_ACCOUNTS)}",
            f"DefaultAccount={SITE_ACCOUNTS[0]}",
            "Cluster=hpcnlp-site",
        )
        self.run(*sacctmgr, "modify", "user", user, "set", f"QOS=normal,{','.join(SITE_QOS)}", "DefaultQOS=normal")

    def _until(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{what} did not come up in {timeout}s; see {self.root}/log")

    def _start_munge(self) -> None:
        """A munged of the cluster's own, on a socket in its root (slurm.conf's AuthInfo), its pid file with
        the daemons' (stop() ends it with them). Clusters used to share the machine's munged, and the one
        that had started it stopped it when its tests ended: another xdist worker's cluster, mid-job, then
        failed every call (`scontrol show job` empty: UNKNOWN until the test timed out)."""
        sock = munge_socket(self.root)
        sock.parent.mkdir(mode=0o755, exist_ok=True)
        key = sock.parent / "munge.key"  # a fresh key: nothing outside this cluster can talk to it
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        run = self.root / "run"
        subprocess.run(
            [
                "/usr/sbin/munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={run}/munged.pid",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={sock.parent}/munged.seed",
            ],
            check=True,
        )  # --force: as root (the tests' user), which munged otherwise refuses

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
        pid (its munged among them), SIGKILL what is left after 15 s."""
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

    # --- using it -----------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), check=check, capture_output=True, text=True, env=kw.pop("env", self.env), **kw)

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
        raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout}s\n{self.diagnosis(job_id)}")

    def diagnosis(self, job_id: str) -> str:
        """What a failed wait shows: scontrol's own answer (an UNKNOWN state is an empty one) and the
        controller's log lines about the job, the last of its other lines, and the nodes' last lines."""
        shown = self.run("scontrol", "show", "job", str(job_id), check=False)
        parts = [
            f"$ scontrol show job {job_id} -> rc {shown.returncode}: {(shown.stdout + shown.stderr).strip()[-800:]}"
        ]
        for log in sorted((self.root / "log").glob("slurm*.log")):
            lines = log.read_text(errors="replace").splitlines()
            about = [line for line in lines if f"JobId={job_id}" in line or f"job {job_id}" in line.lower()]
            parts.append(f"--- {log.name}: lines about the job, then its last lines")
            parts += about[-25:] + ["..."] + lines[-15:]
        return "\n".join(parts)

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
