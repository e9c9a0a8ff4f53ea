"""Timing shared by every benchmark: a step clock, a token-counting collator, the matmul peak,
peak memory, and running one case in a fresh subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (num_proc workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0, device: str = "cpu", dtype=torch.float32) -> float:
    """Best sustained rate of an n x n x n torch.mm loop: the machine's practical matmul peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.process_time  # CPU: CPU seconds, as StepClock
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync()
        t = clock()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = max(best, 4 * 2 * n**3 / max(clock() - t, 1e-9) / 1e9)
    return round(best, 1)


def mfu(r: dict | None, peak: dict | None) -> dict:
    """A training run's FLOP rate against the matmul peak of the dtype it trained in, and against the
    machine's best dtype (on a CPU with AMX, bf16's peak is ~6x fp32's: fp32 MFU would pass 100%)."""
    flops = (r or {}).get("train_gflops_per_second")
    if not flops or not peak:
        return {}
    own = peak.get("gflops_bf16") if r.get("dtype") == "bf16" else peak.get("gflops")
    best = max(v for v in (peak.get("gflops"), peak.get("gflops_bf16")) if v)
    return {"mfu": round(flops / own, 3) if own else None, "mfu_best_dtype": round(flops / best, 3)}


class CountingCollator:
    """Wraps a collator; records real (non-pad) tokens, padded positions and labelled positions of
    each batch, in the order the Trainer consumes them."""

    def __init__(self, collator, pad_token_id: int):
        self.collator, self.pad_token_id, self.batches = collator, pad_token_id, []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        real = batch["attention_mask"].sum() if "attention_mask" in batch else (ids != self.pad_token_id).sum()
        labels = batch.get("labels")
        labelled = int((labels != -100).sum()) if labels is not None and labels.dim() == 2 else 0
        self.batches.append(
            {"tokens": int(real), "positions": ids.numel(), "labelled": labelled, "samples": ids.shape[0]}
        )
        return batch


class StepClock(TrainerCallback):
    """Wall time and this process's CPU time at the end of every optimizer step.

    The CPU time is what the ratios use: on a shared machine wall time also measures the neighbours
    (load average 4-10 on 2 cores here), while CPU time of a 1-thread process is its own work.
    """

    def __init__(self):
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


def steady_rates(clock: StepClock, counts: CountingCollator, warmup: int) -> dict:
    """Rates over the steps after `warmup` (first steps pay allocation and cache warm-up).
    Batch i is consumed by step i (gradient_accumulation_steps 1)."""
    n = len(clock.ends)
    if n <= warmup:
        raise ValueError(f"need more than {warmup} steps to measure, ran {n}")
    first = warmup if warmup else 1
    wall = clock.ends[-1] - clock.ends[first - 1]
    seconds = clock.cpu_ends[-1] - clock.cpu_ends[first - 1]  # CPU seconds (see StepClock)
    batches = counts.batches[first:n]
    total = {k: sum(b[k] for b in batches) for k in ("tokens", "positions", "labelled", "samples")}
    steps = [b - a for a, b in zip(clock.cpu_ends[first - 1 :], clock.cpu_ends[first:])]
    return {
        "measured_steps": len(batches),
        "seconds": round(seconds, 3),
        "wall_seconds_measured": round(wall, 3),
        "tokens_per_second": round(total["tokens"] / seconds, 1),
        "samples_per_second": round(total["samples"] / seconds, 2),
        "wall_tokens_per_second": round(total["tokens"] / wall, 1),
        "wall_samples_per_second": round(total["samples"] / wall, 2),
        "step_seconds_median": round(sorted(steps)[len(steps) // 2], 3),
        "padding_share": round(1 - total["tokens"] / max(total["positions"], 1), 4),
        "labelled_share": round(total["labelled"] / max(total["tokens"], 1), 4),
        **total,
    }


def run_isolated(case: dict, timeout: float) -> dict:
    """Run one case in a fresh `python -m bench.worker` process; its JSON result, or an error entry."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = os.path.join(tmp, "case.json"), os.path.join(tmp, "result.json")
        with open(spec, "w") as f:
            json.dump(case, f)
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.worker", spec, result], timeout=timeout, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = round(time.perf_counter() - t, 1)
        if proc.returncode != 0 or not os.path.isfile(result):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            return {"error": f"exit {proc.returncode}", "log_tail": tail, "wall_seconds": wall}
        with open(result) as f:
            return {**json.load(f), "wall_seconds": wall}
