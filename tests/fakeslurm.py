"""Fake Slurm for the fast tier, submitit-style: tests/fake_slurm/{sbatch,squeue,sacct,scontrol,scancel} put
first on PATH. Each call is recorded (cmd, argv, HPCNLP_* environment) in a JSON-lines log; sbatch hands out
job ids 1001, 1002, ...; squeue and sacct report the states a test sets. The `fake_slurm` fixture (conftest.py)
returns a FakeSlurm.

    def test_x(fake_slurm):
        main(["submit", "--config", "jobs/prepare.yaml"])
        [call] = fake_slurm.calls("sbatch")
        assert "--parsable" in call["argv"]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

FAKE_BIN = Path(__file__).resolve().parent / "fake_slurm"
TOOLS = ("sbatch", "squeue", "sacct", "scontrol", "scancel")


class FakeSlurm:
    def __init__(self, log: Path):
        self.log = log
        self.bin = FAKE_BIN

    def calls(self, cmd: str | None = None) -> list[dict]:
        """Recorded calls in order, each {"cmd", "argv", "env"}; only `cmd`'s when given."""
        if not self.log.is_file():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if cmd is None or r["cmd"] == cmd]

    def set_state(self, job_id: str, state: str | None) -> None:
        """What squeue/sacct say about the job from now on (None: Slurm no longer knows it)."""
        path = self.log.with_name(self.log.name + ".states.json")
        states = json.loads(path.read_text()) if path.is_file() else {}
        if state is None:
            states.pop(str(job_id), None)
        else:
            states[str(job_id)] = state
        path.write_text(json.dumps(states))

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


def install(monkeypatch: pytest.MonkeyPatch, log: Path) -> FakeSlurm:
    """The fake tools first on PATH (then this interpreter's dir, for their `python3`), the log in `log`;
    no HPCNLP_* variables of the calling shell leak into the test."""
    for name in list(os.environ):
        if name.startswith(("HPCNLP_", "FAKE_SBATCH")):
            monkeypatch.delenv(name)
    path = [str(FAKE_BIN), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no __pycache__ beside the tools
    return FakeSlurm(log)


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path) -> FakeSlurm:
    """Registered in conftest.py. The log lives in <tmp_path>/fake-slurm/, outside any job's paths."""
    log_dir = tmp_path / "fake-slurm"
    log_dir.mkdir(exist_ok=True)
    return install(monkeypatch, log_dir / "calls.jsonl")
