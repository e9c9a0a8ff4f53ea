"""Trainer callbacks every training job uses: throughput/ETA/memory logging, and the log history."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from hpcnlp.runtime import rundir
from hpcnlp.runtime.checkpoints import fsync_tree, mark_complete

log = logging.getLogger("hpcnlp.train")


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU when there is one."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s (non-padding, all ranks), samples/s, ETA and memory to every log line; logs each evaluation.

    Rates are over the last logging interval, so a slow start does not hide a fast steady state.
    Needs TrainingArguments(include_num_input_tokens_seen="non_padding") for token counts.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step  # global: per-device batch x grad-accum x world size
        self._t = self._step = self._tokens = None
        self.start_tokens = 0  # tokens seen before this process's run (> 0 after a resume)

    def on_train_begin(self, args, state, control, **kw):
        self._t, self._step, self._tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen
        self.start_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or "loss" not in logs or self._t is None:
            return
        now = time.perf_counter()
        dt, steps = now - self._t, state.global_step - self._step
        if steps <= 0 or dt <= 0:
            return
        tokens = state.num_input_tokens_seen - self._tokens
        logs["tokens_per_second"] = round(tokens / dt, 1)
        logs["samples_per_second"] = round(steps * self.samples_per_step / dt, 2)
        remaining = max(state.max_steps - state.global_step, 0)
        logs["eta_seconds"] = round(remaining * dt / steps)
        logs.update(peak_memory_mb())
        self._t, self._step, self._tokens = now, state.global_step, state.num_input_tokens_seen
        if state.is_world_process_zero:
            log.info(
                "step %d/%d loss %.4f lr %.3g | %s tok/s %s samples/s | ETA %s | rss %s MB%s",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", 0),
                f"{logs['tokens_per_second']:,.0f}",
                logs["samples_per_second"],
                _hms(logs["eta_seconds"]),
                logs["peak_rss_mb"],
                f" gpu {logs['peak_gpu_mb']} MB" if "peak_gpu_mb" in logs else "",
            )

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        # The metrics otherwise only reach trainer_state.json inside the next checkpoint.
        if not metrics or not state.is_world_process_zero:
            return
        shown = {
            k.removeprefix("eval_"): round(v, 4)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second", "epoch"))
        }
        log.info(
            "eval at step %d/%d (epoch %.2f): %s",
            state.global_step,
            state.max_steps,
            state.epoch or 0,
            " ".join(f"{k} {v}" for k, v in shown.items()),
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CheckpointMarker(TrainerCallback):
    """After each save: every rank syncs the checkpoint's files, then rank 0 marks it complete
    (runtime/checkpoints.py); only marked checkpoints of the same run are ever resumed."""

    def __init__(self, run: str):
        self.run = run
        self.last_marked: int | None = None  # step of the newest checkpoint marked in this process's run

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        distributed = dist.is_available() and dist.is_initialized()
        fsync_tree(ckpt)
        if distributed:
            dist.barrier()  # every rank's optimizer and RNG files are written and synced
        if state.is_world_process_zero:
            mark_complete(ckpt, self.run, bf16=args.bf16)
            rundir.record_files(args.output_dir)  # what the run has written so far is its own
        if distributed:
            dist.barrier()  # no rank goes on (or reports the save) before the marker is there
        self.last_marked = state.global_step
