"""Preemption: on Slurm's warning signal, save a complete checkpoint at the next step and exit.

Slurm sends SIGUSR1 (`--signal=B:USR1@<s>`) to the batch shell (slurm/launch.sh). Launchers such
as torchrun do not pass USR1 on, so the shell forwards it as a flag file ($HPCNLP_PREEMPT_FILE, on
the shared filesystem) that the ranks poll; `touch <output_dir>/.preempt` does the same by hand.
A signal that reaches a rank directly (USR1, SIGTERM) counts too. Each rank notes the request; at every
step boundary the ranks agree (all-reduce of the flag) so they all stop after the *same* step, the
Trainer saves a checkpoint there, and the job exits with REQUEUE_EXIT so the batch script requeues
it. SIGTERM (scancel, time limit without warning) is treated the same way.

Only the process that installed the handlers acts on a signal: a forked worker (dataloader, dataset
map) that inherited them dies of the signal as it would without them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hpcnlp.runtime import env

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "checkpointed; run me again"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _cpu_index_deserialize(obj, location: str):
    # Resuming, the Trainer loads optimizer.pt with map_location=args.device, which is "cpu:<rank>"
    # in a multi-process CPU run; torch's loader only knows "cpu" and fails. Same memory: keep it.
    if location.startswith("cpu:"):
        return obj
    return None


_early = {"pid": None, "requested": False}  # the job's main process, and whether a signal came before training


def arm() -> dict:
    """First thing in a training job's process, before it claims its run dir: from now on USR1/TERM is a
    request to stop (the run exits 75 with status.json saying so), never sudden death. Returns the
    handlers it replaced (for `disarm`)."""
    _early.update(pid=os.getpid(), requested=False)
    return {sig: signal.signal(sig, _on_early_signal) for sig in SIGNALS}


def disarm(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _early.update(pid=None, requested=False)


def _on_early_signal(signum, frame):
    if os.getpid() != _early["pid"]:  # a forked worker (data preparation): dies of it, as without us
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _early["requested"] = True
    log.warning("received %s before training: the job will stop and exit %d", signal.Signals(signum).name, REQUEUE_EXIT)


torch.serialization.register_package(11, lambda obj: None, _cpu_index_deserialize)  # 11: just after "cpu"


class PreemptionCallback(TrainerCallback):
    """One per training run. `requested`: this process was asked (signal, flag file); `stopped`: the
    ranks agreed at a step boundary to save and stop there (the same on every rank)."""

    def __init__(self, output_dir: str):
        self.requested = False
        self.stopped = False
        self.flag_file = os.path.join(output_dir, ".preempt")  # any process on any node may create it
        self.launcher_flag = env.hpcnlp_setting("PREEMPT_FILE")  # set by slurm/launch.sh
        self._owner = os.getpid()
        self._previous: dict[int, object] = {}

    # --- signals (the job's main process only) ---------------------------------------------
    def install_handlers(self) -> None:
        self._owner = os.getpid()
        self.requested = self.requested or bool(_early["requested"])  # a signal before training began
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame):
        if os.getpid() != self._owner:  # a forked worker: behave as if no handler had been installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        log.warning(
            "received %s: will checkpoint at the next step boundary and exit %d",
            signal.Signals(signum).name,
            REQUEUE_EXIT,
        )

    # --- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kw):
        # One line per rank: the job log shows every rank is up (and armed for preemption).
        log.info(
            "rank %d of %d ready at step %d (pid %d on %s)",
            env.rank(),
            env.world_size(),
            state.global_step,
            os.getpid(),
            socket.gethostname(),
        )

    def on_step_end(self, args, state, control, **kw):
        local = (
            self.requested
            or os.path.exists(self.flag_file)
            or bool(self.launcher_flag and os.path.exists(self.launcher_flag))
        )
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([int(local)], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            local = bool(t.item())
        if local and not self.stopped:
            self.requested = self.stopped = True
            control.should_save = True
            control.should_training_stop = True
            # Keep this checkpoint: with load_best_model_at_end and save_total_limit 1 the Trainer deletes
            # every checkpoint but the best one when train() ends, this one included.
            args.save_total_limit = None
            log.warning("preemption: saving checkpoint-%d and stopping", state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if self.requested and state.is_world_process_zero and os.path.exists(self.flag_file):
            os.unlink(self.flag_file)


def requeue_exit(step: int) -> int:
    """What a job returns after train() stopped for a preemption: the checkpoint is saved."""
    log.warning("checkpointed at step %d; exiting %d for requeue", step, REQUEUE_EXIT)
    return REQUEUE_EXIT
