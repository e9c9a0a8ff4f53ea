"""bf16 training on CPU (`training.bf16: true`: the Trainer's own autocast) for pretrain, finetune and distill,
one process and under torchrun; `training.bf16: auto` (train/precision.py: the choice from fake probe results,
the probe itself, a resumed run keeping its dtype) and what `hpcnlp check` says about bf16 on this machine.

Whether bf16 is *faster* is make bench's question (bench/results): here only that it runs, trains in bf16
(accelerate's mixed_precision) and keeps fp32 weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from helpers import SENTIMENT_DATA, prepare_corpus, run_cli, tiny_pretrain, torchrun, write_config

from hpcnlp.config import TrainingConfig
from hpcnlp.runtime.checkpoints import MARKER
from hpcnlp.train import precision
from hpcnlp.train.precision import MARGIN, Probe, choose_bf16

QUIET = {"eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "seed": 7, "bf16": True}
DATA = {**SENTIMENT_DATA, "max_eval_samples": 32}


def _finetune(tmp_path: Path, steps: int = 3) -> Path:
    return write_config(
        tmp_path / "finetune.yaml",
        {
            "job": "finetune",
            "task": "sequence-classification",
            "model_name_or_path": "minilm-l6",
            "output_dir": str(tmp_path / "teacher"),
            "data": DATA,
            "training": {**QUIET, "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-4},
        },
    )


def _distill(tmp_path: Path, teacher: Path, steps: int = 3) -> Path:
    return write_config(
        tmp_path / "distill.yaml",
        {
            "job": "distill",
            "teacher": str(teacher),
            "output_dir": str(tmp_path / "student"),
            "student_num_layers": 2,
            "data": DATA,
            "latency": {"batch_sizes": [8], "seq_length": 32, "repeats": 2, "warmup": 1},
            "training": {**QUIET, "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 2e-4},
        },
    )


def _trained_in_bf16(out: Path, world_size: int = 1) -> dict:
    from safetensors.torch import load_file

    m = json.loads((out / "metrics.json").read_text())
    assert m["mixed_precision"] == "bf16" and m["world_size"] == world_size
    assert m["train_loss"] is not None and math.isfinite(m["train_loss"])
    weights = load_file(out / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}  # autocast: fp32 master weights
    return m


# Rates as the AMD EPYC (avx512_bf16, no AMX) and the Xeon without AMX of bench/results measured them.
EPYC = Probe(fp32_gflops=96.0, bf16_gflops=212.0, threads=1, seconds=0.3)
XEON_NO_AMX = Probe(fp32_gflops=136.0, bf16_gflops=75.0, threads=1, seconds=0.3)


def test_choose_bf16_from_fake_probes():
    assert choose_bf16("auto", None, EPYC).bf16 is True
    assert choose_bf16("auto", None, XEON_NO_AMX).bf16 is False
    reason = choose_bf16("auto", None, EPYC).reason
    assert "212 GFLOP/s" in reason and "fp32 96" in reason and "2.21x" in reason  # both rates, the ratio
    # the margin: a bf16 barely faster than fp32 loses to the casts and fp32 ops around the matmuls
    assert choose_bf16("auto", None, Probe(100.0, 100.0 * MARGIN - 1, 1, 0.3)).bf16 is False
    assert choose_bf16("auto", None, Probe(100.0, 100.0 * MARGIN, 1, 0.3)).bf16 is True
    # true / false force it, whatever the probe, the GPU or a checkpoint say
    assert choose_bf16(True, None, XEON_NO_AMX).bf16 is True and choose_bf16(False, True, EPYC).bf16 is False
    assert choose_bf16(False, None, None, checkpoint=True).bf16 is False
    # a GPU: its bf16 support decides; fp16 on: never bf16; a resumed run keeps its checkpoint's dtype
    assert choose_bf16("auto", True, None).bf16 is True and choose_bf16("auto", False, None).bf16 is False
    assert choose_bf16("auto", None, EPYC, fp16=True).bf16 is False
    assert choose_bf16("auto", None, XEON_NO_AMX, checkpoint=True).bf16 is True
    assert choose_bf16("auto", None, EPYC, checkpoint=False).bf16 is False
    with pytest.raises(ValueError):
        choose_bf16(None, None, EPYC)


def test_probe_times_both_dtypes_here_in_bounded_time():
    import torch

    precision.probe.cache_clear()
    minilm = precision.Shape(384, 1536, 16 * 128)  # MiniLM at batch 16 x 128 tokens
    threads = torch.get_num_threads()
    start = time.perf_counter()
    p = precision.probe(minilm, 2)
    took = time.perf_counter() - start
    assert p.fp32_gflops > 0 and p.bf16_gflops > 0 and p.threads == 2
    # 0.2 s of timed repeats after a warm-up: a few hundred ms (2 shared cores here: headroom for load)
    assert p.seconds <= took < 3
    assert precision.probe(minilm, 2) is p  # cached: a pipeline's stages share it
    assert torch.get_num_threads() == threads  # the process's threads as they were


def test_bf16_is_true_false_or_auto(tmp_path, capsys):
    assert TrainingConfig().bf16 == "auto"  # the shipped default
    assert run_cli("check", "--config", str(tiny_pretrain(tmp_path)), "training.bf16=null") == 2
    out = capsys.readouterr()
    assert "training.bf16: must be true, false or auto (got None). Fix: write auto" in out.out + out.err


def test_auto_follows_the_probe_and_a_bf16_gpu(tmp_path, monkeypatch):
    import torch

    from hpcnlp.train import harness

    monkeypatch.setattr(precision, "probe", lambda *shape: EPYC)
    assert harness.training_arguments(TrainingConfig(), str(tmp_path)).bf16 is True
    assert harness.training_arguments(TrainingConfig(bf16=False), str(tmp_path)).bf16 is False
    monkeypatch.setattr(precision, "probe", lambda *shape: XEON_NO_AMX)
    assert harness.training_arguments(TrainingConfig(), str(tmp_path)).bf16 is False
    assert harness.training_arguments(TrainingConfig(bf16=True), str(tmp_path)).bf16 is True
    # A bf16 GPU stood in for by torch.cuda's two answers (CI has no GPU); no probe runs there.
    monkeypatch.setattr(precision, "probe", lambda *shape: pytest.fail("probed on a GPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.decide("auto", precision.Shape(384, 1536, 2048)).bf16 is True
    assert precision.decide("auto", precision.Shape(384, 1536, 2048), fp16=True).bf16 is False


def test_a_bf16_job_leaves_no_autocast_to_the_next_job_in_the_process(tmp_path, monkeypatch):
    """TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION for the process, which the next Trainer's
    Accelerator reads: a local pipeline's fp32 stage after a bf16 one (or a torchrun it starts) ran in bf16."""
    import os

    from hpcnlp.train import harness

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    harness.training_arguments(TrainingConfig(bf16=True), str(tmp_path))
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    harness.training_arguments(TrainingConfig(bf16=False), str(tmp_path))
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"


def test_check_says_what_auto_picks_here(tmp_path, monkeypatch, capsys):
    """`hpcnlp check` runs the job's probe on this machine: one line with both rates; a warning when
    true/false forces the other dtype."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert run_cli("check", "--config", str(tiny_pretrain(tmp_path))) == 0
    out = capsys.readouterr().out  # the CLI logs to stdout
    line = next(x for x in out.splitlines() if "training.bf16: auto -> " in x)
    assert "INFO hpcnlp.checks" in line and "GFLOP/s vs fp32" in line
    assert "32x32 and 32x64 at 256 tokens" in line  # the job's shape: scratch sizes, batch 8 x 32 tokens
    monkeypatch.setattr(precision, "probe", lambda *shape: XEON_NO_AMX)
    assert run_cli("check", "--config", str(tiny_pretrain(tmp_path)), "training.bf16=true") == 0
    out = capsys.readouterr().out
    assert "WARNING hpcnlp.checks: training.bf16: true, but auto would pick fp32 on this node: bf16 matmuls 75" in out
    assert "ok:" in out


@pytest.mark.slow
def test_a_resumed_auto_run_keeps_its_checkpoints_dtype(tmp_path, monkeypatch):
    """bf16 picked at the start (the probe said so) stays bf16 after a resume, even where the probe would
    now say fp32: the checkpoint's marker records the dtype, and no probe runs."""
    config = tiny_pretrain(tmp_path, save_steps=3)
    monkeypatch.setattr(precision, "probe", lambda *shape: EPYC)
    assert run_cli("pretrain", "--config", str(config), "training.max_steps=3") == 0
    first = _trained_in_bf16(tmp_path / "out")
    assert first["bf16"] is True and first["probe_gflops_bf16"] == 212.0 and first["probe_gflops_fp32"] == 96.0
    assert json.loads((tmp_path / "out" / "checkpoint-3" / MARKER).read_text())["bf16"] is True

    monkeypatch.setattr(precision, "probe", lambda *shape: pytest.fail("a resumed run probed again"))
    assert run_cli("pretrain", "--config", str(config), "resume=continue", "training.max_steps=6") == 0
    m = _trained_in_bf16(tmp_path / "out")
    assert m["resumed_from"].endswith("checkpoint-3") and m["global_step"] == 6
    assert m["bf16_reason"] == "the checkpoint resumed was trained in bf16" and "probe_gflops_bf16" not in m


@pytest.mark.slow
def test_pretrain_in_bf16(tmp_path):
    assert run_cli("pretrain", "--config", str(tiny_pretrain(tmp_path, bf16=True))) == 0
    _trained_in_bf16(tmp_path / "out")


@pytest.mark.slow
def test_finetune_then_distill_in_bf16(tmp_path):
    assert run_cli("finetune", "--config", str(_finetune(tmp_path))) == 0
    _trained_in_bf16(tmp_path / "teacher")
    assert run_cli("distill", "--config", str(_distill(tmp_path, tmp_path / "teacher"))) == 0
    _trained_in_bf16(tmp_path / "student")


@pytest.mark.slow
def test_bf16_under_torchrun(tmp_path):
    """pretrain, finetune and distill, each two CPU processes (gloo) in bf16; the ranks stay identical."""
    pretrain = tiny_pretrain(tmp_path, bf16=True)
    prepare_corpus(pretrain)
    for job, config, out in (
        ("pretrain", pretrain, "out"),
        ("finetune", _finetune(tmp_path, 2), "teacher"),
        ("distill", _distill(tmp_path, tmp_path / "teacher", 2), "student"),
    ):
        proc = torchrun([job, "--config", str(config)])
        assert proc.returncode == 0, job + ": " + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert _trained_in_bf16(tmp_path / out, world_size=2)["replicas_identical"] is True, job


@pytest.mark.slow
def test_auto_under_torchrun_is_one_choice_for_every_rank(tmp_path):
    """Two processes with training.bf16: auto: rank 0 probes (MiniLM's shapes: bf16 on an AMX CPU) and
    every rank trains in the dtype it picked, so they stay replicas."""
    config = _finetune(tmp_path, 2)
    proc = torchrun(["finetune", "--config", str(config), "training.bf16=auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["replicas_identical"] is True
    assert m["mixed_precision"] == ("bf16" if m["bf16"] else "no") and "GFLOP/s" in m["bf16_reason"]
    picked = {line.split("training.bf16: auto -> ")[1][:4] for line in proc.stdout.splitlines() if "auto -> " in line}
    assert len(picked) == 1 and proc.stdout.count("training.bf16: auto -> ") == 2  # one line per rank, one dtype


def test_attention_runs_in_fp32_under_bf16_on_a_cpu(monkeypatch):
    """precision.attention_in_fp32: bf16 q/k/v give bf16 out, computed in fp32 (the same as fp32's result
    rounded once), with grads; fp32 calls are untouched; a second call wraps nothing twice."""
    import torch
    import torch.nn.functional as F

    stock = getattr(F.scaled_dot_product_attention, "__wrapped__", F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", stock)  # an earlier bf16 job here may have wrapped it
    precision.attention_in_fp32()
    wrapped = F.scaled_dot_product_attention
    precision.attention_in_fp32()
    assert F.scaled_dot_product_attention is wrapped and wrapped is not stock
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, 12:] = float("-inf")
    exact = stock(q, k, v, attn_mask=mask)
    assert torch.equal(wrapped(q, k, v, attn_mask=mask), exact)  # fp32 in: the stock call
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", torch.bfloat16):
        out = wrapped(qb, kb, vb, attn_mask=mask.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, stock(qb.float(), kb.float(), vb.float(), attn_mask=mask).bfloat16())
    out.float().sum().backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16
