"""`training.bf16: auto`: bf16 where it is faster on the machine the job runs on.

On a GPU that is `torch.cuda.is_bf16_supported()`. On a CPU no flag says it: the same avx512_bf16
without AMX was 0.55x fp32's matmul rate on one Xeon and 2.2x on an AMD EPYC (docs/performance.md).
So a short probe times the job's own matmuls (hidden x hidden and hidden x intermediate at the job's
batch * seq tokens, on the threads the job uses) in fp32 and under the Trainer's bf16 autocast, and
`choose_bf16` picks bf16 when it wins by MARGIN. `hpcnlp check` runs the same probe.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Literal

# bf16 is picked when its matmul rate is at least MARGIN x fp32's. Why 1.2 and not 1.0: the matmuls are
# not the whole step (under autocast LayerNorm, softmax, the loss and the optimizer stay fp32). Two machines
# give training speed against matmul speed: matmul 0.55x -> training 0.64-0.77x (Xeon without AMX,
# bench/results), matmul 2.2x -> training 1.5-1.63x (EPYC, issue #31). Lines through them cross equal
# training speed between 1.07x and 1.2x matmul; 1.2 takes the top, so a near-tie (within the noise of a
# few-hundred-ms probe) stays fp32, which changes nothing. The probe's own casts are timed with the bf16 side.
MARGIN = 1.2
# The probe's GEMMs are at most this many rows (tokens) tall: taller ones are compute-bound already
# and would only make the probe slower (BERT-base's fp32 GEMMs at 2,048 rows took 0.2 s a call here).
MAX_ROWS = 1024
BUDGET_S = 0.2  # timed repeats stop after this (warm-up not counted); at least MIN_REPEATS each
MIN_REPEATS = 2
FALLBACK_DIMS = (768, 3072)  # BERT-base: when the model's config cannot be read (yet)

Setting = bool | Literal["auto"]


@dataclasses.dataclass(frozen=True)
class Shape:
    """The job's matmuls: hidden x hidden and hidden x intermediate over `tokens` rows."""

    hidden: int
    intermediate: int
    tokens: int

    def __str__(self) -> str:
        timed = f" (timed at {MAX_ROWS})" if self.tokens > MAX_ROWS else ""
        return f"{self.hidden}x{self.hidden} and {self.hidden}x{self.intermediate} at {self.tokens} tokens{timed}"


def shape_of(model_config: dict | None, batch: int, seq: int) -> Shape:
    """The probe's shape from a model's config.json (BERT-like keys, or DistilBERT's dim/hidden_dim)."""
    config = model_config or {}
    hidden = config.get("hidden_size") or config.get("dim")
    intermediate = config.get("intermediate_size") or config.get("hidden_dim")
    if not isinstance(hidden, int):
        hidden, intermediate = FALLBACK_DIMS
    if not isinstance(intermediate, int):
        intermediate = 4 * hidden
    return Shape(hidden, intermediate, batch * seq)


def job_shape(cfg, model_config: dict | None) -> Shape:
    """A training job's probe shape: its batch per device x data.max_seq_length tokens (128 for a job
    without one), the sizes from its model's config."""
    seq = getattr(getattr(cfg, "data", None), "max_seq_length", 128)
    return shape_of(model_config, cfg.training.per_device_train_batch_size, seq)


@dataclasses.dataclass(frozen=True)
class Probe:
    fp32_gflops: float
    bf16_gflops: float
    threads: int
    seconds: float
    shape: Shape | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    bf16: bool
    reason: str
    probe: Probe | None = None

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def metrics(self) -> dict:
        """What metrics.json records about the choice."""
        out = {"bf16": self.bf16, "bf16_reason": self.reason}
        if self.probe:
            out |= {
                "probe_gflops_fp32": self.probe.fp32_gflops,
                "probe_gflops_bf16": self.probe.bf16_gflops,
                "probe_threads": self.probe.threads,
            }
        return out


def choose_bf16(
    setting: Setting, gpu: bool | None, probe: Probe | None, fp16: bool = False, checkpoint: bool | None = None
) -> Choice:
    """Whether to train in bf16. `setting`: training.bf16; `gpu`: None on a CPU, else whether the GPU has
    bf16; `probe`: the CPU probe's rates (CPU with auto only); `checkpoint`: whether the checkpoint the run
    resumes was trained in bf16, None when it starts fresh or the checkpoint does not say."""
    if setting is True or setting is False:
        return Choice(setting, f"training.bf16: {str(setting).lower()}")
    if setting != "auto":
        raise ValueError(f"training.bf16: {setting!r} is not true, false or auto")
    if fp16:
        return Choice(False, "training.fp16 is on")
    if checkpoint is not None:
        return Choice(checkpoint, f"the checkpoint resumed was trained in {'bf16' if checkpoint else 'fp32'}")
    if gpu is not None:
        return Choice(gpu, "the GPU has bf16" if gpu else "the GPU has no bf16")
    if probe is None:
        return Choice(False, "no probe ran")
    ratio = probe.bf16_gflops / max(probe.fp32_gflops, 1e-9)
    return Choice(
        ratio >= MARGIN,
        f"bf16 matmuls {probe.bf16_gflops:.0f} GFLOP/s vs fp32 {probe.fp32_gflops:.0f} = {ratio:.2f}x, bf16 needs "
        f"{MARGIN}x; {probe.threads} thread(s), {probe.shape}, probe {probe.seconds * 1000:.0f} ms",
        probe,
    )


def decide(setting: Setting, shape: Shape, fp16: bool = False, checkpoint: bool | None = None) -> Choice:
    """choose_bf16 on this machine: its GPU, or (CPU, auto, nothing else deciding) the probe of `shape`."""
    import torch

    gpu = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    measure = setting == "auto" and gpu is None and not fp16 and checkpoint is None
    return choose_bf16(setting, gpu, probe(shape, torch.get_num_threads()) if measure else None, fp16, checkpoint)


@functools.cache
def probe(shape: Shape, threads: int) -> Probe:
    """Time the job's matmuls in fp32 and under bf16 autocast (as the Trainer runs them: fp32 weights cast
    at each call) on `threads` torch threads (the job's). Warm-up first (oneDNN builds its kernels at the
    first call of a shape), then fp32 and bf16 alternate so that load from elsewhere hits both alike, and
    each keeps its best repeat: other work only ever slows a repeat down. Cached: a pipeline's stages share it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed(shape)
    finally:
        torch.set_num_threads(before)


def _timed(shape: Shape) -> Probe:
    import torch
    import torch.nn.functional as F

    rows = min(shape.tokens, MAX_ROWS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, shape.hidden, generator=gen)
    weights = [
        torch.randn(shape.hidden, shape.hidden, generator=gen),
        torch.randn(shape.intermediate, shape.hidden, generator=gen),
    ]
    flops = 2 * rows * shape.hidden * (shape.hidden + shape.intermediate)

    def once(bf16: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            return time.perf_counter() - start

    t0 = time.perf_counter()
    for bf16 in (False, True):  # warm-up
        once(bf16)
    best = {False: float("inf"), True: float("inf")}
    timed, repeats = time.perf_counter(), 0
    while repeats < MIN_REPEATS or time.perf_counter() - timed < BUDGET_S:
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], once(bf16))
        repeats += 1
    return Probe(
        fp32_gflops=round(flops / best[False] / 1e9, 1),
        bf16_gflops=round(flops / best[True] / 1e9, 1),
        threads=torch.get_num_threads(),
        seconds=round(time.perf_counter() - t0, 3),
        shape=shape,
    )


def attention_in_fp32() -> None:
    """Under bf16 on a CPU, run torch's scaled_dot_product_attention in fp32: q, k and v cast up, the output
    cast back. torch's bf16 flash-attention backward on CPU took 4x fp32's time for MiniLM's 32-wide heads at
    block 128 (bench/results/profile_step.md), a third of the bf16 step, while the matmuls around it are what
    bf16 speeds up. Process-wide (SDPA is called through torch.nn.functional by every model; a job is its own
    process) and idempotent; CUDA tensors and fp32 calls go straight through."""
    import torch
    import torch.nn.functional as F

    inner = F.scaled_dot_product_attention
    if getattr(inner, "hpcnlp_fp32", False):
        return

    @functools.wraps(inner)  # __wrapped__: the stock function
    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if query.dtype != torch.bfloat16 or query.device.type != "cpu":
            return inner(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):
            out = inner(query.float(), key.float(), value.float(), attn_mask, *args, **kwargs)
        return out.to(query.dtype)

    sdpa.hpcnlp_fp32 = True
    F.scaled_dot_product_attention = sdpa
