"""Preemption: on Slurm's warning signal, save a complete checkpoint at the next step and exit.

Slurm sends SIGUSR1 (`--signal=B:USR1@<s>`) to the batch shell (slurm/launch.sh). Launchers such
as torchrun do not pass USR1 on, so the shell forwards it as a flag file ($HPCNLP_PREEMPT_FILE, on
the shared filesystem) that the ranks poll; `touch <output_dir>/.preempt` does the same by hand.
A signal that reaches a rank directly (USR1, SIGTERM) counts too. Each rank notes the request; at every
step boundary the ranks agree (all-reduce of the flag) so they all stop after the *same* step, the
Trainer saves a checkpoint there, and the job exits with REQUEUE_EXIT so the batch script requeues
it. SIGTERM (scancel, time limit without warning) is treated the same way.
"""
from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hpcnlp.runtime import env

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "checkpointed; run me again"
_requested = False


def _cpu_index_deserialize(obj, location: str):
    # Resuming, the Trainer loads optimizer.pt with map_location=args.device, which is "cpu:<rank>"
    # in a multi-process CPU run; torch's loader only knows "cpu" and fails. Same memory: keep it.
    if location.startswith("cpu:"):
        return obj
    return None


torch.serialization.register_package(11, lambda obj: None, _cpu_index_deserialize)  # 11: just after "cpu"


def _on_signal(signum, frame):
    global _requested
    _requested = True
    log.warning("received %s: will checkpoint at the next step boundary and exit %d",
                signal.Signals(signum).name, REQUEUE_EXIT)


def install_handlers() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def requested() -> bool:
    return _requested


def requeue_exit(step: int) -> int:
    """What a job returns after train() stopped for a preemption: the checkpoint is saved."""
    log.warning("checkpointed at step %d; exiting %d for requeue", step, REQUEUE_EXIT)
    return REQUEUE_EXIT


def _flag_file(output_dir: str) -> str:
    # A file any process on any node can create to ask for a checkpoint; launcher-agnostic.
    return os.path.join(output_dir, ".preempt")


class PreemptionCallback(TrainerCallback):
    def __init__(self, output_dir: str):
        self.flag_file = _flag_file(output_dir)
        self.launcher_flag = env.hpcnlp_setting("PREEMPT_FILE")  # set by slurm/launch.sh

    def on_train_begin(self, args, state, control, **kw):
        # One line per rank: the job log shows every rank is up (and armed for preemption).
        log.info("rank %d of %d ready at step %d", env.rank(), env.world_size(), state.global_step)

    def on_step_end(self, args, state, control, **kw):
        global _requested
        local = (_requested or os.path.exists(self.flag_file)
                 or bool(self.launcher_flag and os.path.exists(self.launcher_flag)))
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([int(local)], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            local = bool(t.item())
        if local:
            _requested = True
            control.should_save = True
            control.should_training_stop = True
            log.warning("preemption: saving checkpoint-%d and stopping", state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if _requested and state.is_world_process_zero and os.path.exists(self.flag_file):
            os.unlink(self.flag_file)
