"""A step watchdog: a rank that makes no progress for `step_timeout_minutes` fails the job with a line
naming the stalled rank and node, long before the process group's timeout (30 min by default).

Every rank's thread writes a heartbeat (`<output_dir>/.heartbeat/rank-<r>.json`) every few seconds
while its process runs. Training steps, evaluation batches and checkpoint saves count as progress.
When a rank sees no progress for the limit, it reads the heartbeats: a rank whose heartbeat stopped
is stalled itself (SIGSTOP, a hung node); else every rank waits on something (a dead peer, slow I/O).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from hpcnlp.runtime import env, status
from hpcnlp.runtime.io import atomic_write_json

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0  # at most; short limits (tests) beat faster


class StepWatchdog(TrainerCallback):
    def __init__(self, output_dir: str, timeout_minutes: float | None):
        self.timeout = None if timeout_minutes is None else timeout_minutes * 60
        self.beat = HEARTBEAT_SECONDS if self.timeout is None else min(HEARTBEAT_SECONDS, self.timeout / 6)
        self.dir = Path(output_dir) / ".heartbeat"
        self.rank, self.host = env.rank(), socket.gethostname()
        self.step, self.last_progress = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _progress(self, state=None):
        self.last_progress = time.monotonic()
        if state is not None:
            self.step = state.global_step

    def on_train_begin(self, args, state, control, **kw):
        self._progress(state)
        if self.timeout is not None and self._thread is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._beat()  # at once: a rank stopped in its first seconds must still be told from a live one
            self._thread = threading.Thread(target=self._watch, name="hpcnlp-watchdog", daemon=True)
            self._thread.start()

    def on_step_end(self, args, state, control, **kw):
        self._progress(state)

    def on_prediction_step(self, args, state, control, **kw):
        self._progress()

    def on_save(self, args, state, control, **kw):
        self._progress()

    def on_evaluate(self, args, state, control, **kw):
        self._progress()

    def on_train_end(self, args, state, control, **kw):
        self._stop.set()
        (self.dir / f"rank-{self.rank}.json").unlink(missing_ok=True)

    def _beat(self):
        atomic_write_json(
            self.dir / f"rank-{self.rank}.json",
            {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step, "time": time.time()},
        )

    def _watch(self):
        while not self._stop.wait(self.beat):
            self._beat()
            idle = time.monotonic() - self.last_progress
            if idle > self.timeout:
                message = (
                    f"rank {self.rank} on {self.host}: no training step for {idle / 60:.1f} min "
                    f"(step_timeout_minutes {self.timeout / 60:g}, last step {self.step}); "
                    f"{self._stalled_ranks()}"
                )
                log.error("%s; failing the job (exit %d)", message, status.EXIT_STALLED)
                logging.shutdown()
                status.stalled(message, self.dir.parent / "status.json")

    def _stalled_ranks(self) -> str:
        now, stale = time.time(), []
        for f in sorted(self.dir.glob("rank-*.json")):
            try:
                beat = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if now - beat["time"] > 3 * self.beat:
                stale.append(
                    f"rank {beat['rank']} on {beat['host']} (pid {beat['pid']}, step {beat['step']}, "
                    f"silent for {now - beat['time']:.0f} s)"
                )
        return ("stalled: " + ", ".join(stale)) if stale else "every rank is alive but waiting"
