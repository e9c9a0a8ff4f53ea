"""Shared body of the fake Slurm tools in this directory (sbatch, squeue, sacct, scontrol, scancel).

Each tool appends one JSON line per call to $FAKE_SLURM_LOG:
    {"cmd": "sbatch", "argv": [...], "env": {HPCNLP_* and the variables HPCNLP_PASS_ENV names}}
and prints what the real tool prints for that call. State beside the log file:
    <log>.counter        the last job id sbatch handed out (ids count up from 1001)
    <log>.states.json    {"<job id>": "RUNNING", ...}: what squeue and sacct report (tests write it)
$FAKE_SBATCH_FAIL set: sbatch refuses every job with that message (exit 1), as a real one refuses.
Standard library only: these run under whatever python3 is first on PATH.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from pathlib import Path


def _log() -> Path:
    path = os.environ.get("FAKE_SLURM_LOG")
    if not path:
        sys.exit(f"{Path(sys.argv[0]).name} (fake): FAKE_SLURM_LOG is not set")
    return Path(path)


def record(cmd: str, argv: list[str]) -> None:
    passed = os.environ.get("HPCNLP_PASS_ENV", "").split()
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("HPCNLP_") or k in passed}
    with open(_log(), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({"cmd": cmd, "argv": argv, "env": env}) + "\n")


def next_id() -> str:
    counter = _log().with_name(_log().name + ".counter")
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        last = int(f.read().strip() or 1000)
        f.seek(0)
        f.truncate()
        f.write(str(last + 1))
    return str(last + 1)


def states() -> dict:
    path = _log().with_name(_log().name + ".states.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def option(argv: list[str], *names: str) -> str | None:
    """The value of -j X, -jX, --jobs=X, --jobs X (the last given)."""
    value = None
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                value = argv[i + 1]
            elif n.startswith("--") and a.startswith(n + "="):
                value = a.split("=", 1)[1]
            elif not n.startswith("--") and a.startswith(n) and len(a) > len(n):
                value = a[len(n) :]
    return value


def sbatch(argv: list[str]) -> int:
    if os.environ.get("FAKE_SBATCH_FAIL"):
        print(f"sbatch: error: {os.environ['FAKE_SBATCH_FAIL']}", file=sys.stderr)
        return 1
    script = next((a for a in argv if not a.startswith("-")), None)
    if script is None or not Path(script).is_file():
        print(f"sbatch: error: Unable to open file {script}", file=sys.stderr)
        return 1
    job_id = next_id()
    print(job_id if "--parsable" in argv else f"Submitted batch job {job_id}")
    return 0


def squeue(argv: list[str]) -> int:
    """-j ID -o %T: the job's state while Slurm keeps it; nothing for a job it does not know."""
    job = option(argv, "-j", "--jobs")
    known = states()
    for j in job.split(",") if job else sorted(known):
        if j in known:
            print(known[j] if "-h" in argv or "--noheader" in argv else f"STATE\n{known[j]}")
    return 0


def sacct(argv: list[str]) -> int:
    job = option(argv, "-j", "--jobs")
    if job in states():
        print(states()[job])
    return 0


def expand_hostlist(nodelist: str) -> list[str]:
    """node[01-03,7],gpu5 -> node01 node02 node03 node7 gpu5 (Slurm's hostlist syntax, one bracket)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def scontrol(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("-")]
    if args[:2] == ["show", "hostnames"]:
        nodelist = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        print("\n".join(expand_hostlist(nodelist)))
    elif args[:2] == ["show", "node"] and len(args) > 2:
        print(f"NodeName={args[2]} Arch=x86_64 CPUTot=16 NodeAddr={args[2]} NodeHostName={args[2]} State=ALLOCATED")
    elif args[:2] == ["show", "job"] and len(args) > 2:
        print(
            f"JobId={args[2]} JobName=fake JobState={states().get(args[2], 'RUNNING')} "
            f"StdOut={os.getcwd()}/slurm-{args[2]}.out"
        )
    elif args[:1] == ["requeue"]:
        pass
    else:
        print(f"scontrol (fake): unsupported call {argv}", file=sys.stderr)
        return 1
    return 0


def scancel(argv: list[str]) -> int:
    return 0


def main(cmd: str) -> None:
    argv = sys.argv[1:]
    record(cmd, argv)
    sys.exit({"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scontrol": scontrol, "scancel": scancel}[cmd](argv))
