"""Continued pretraining for real: packaged MiniLM, real Python-docs text, a few steps on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import preempt_at, torchrun

from hpcnlp.cli import main
from hpcnlp.data.pack import Blocks
from hpcnlp.runtime import preempt
from hpcnlp.runtime.checkpoints import newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 8-step run, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = REPO / "data/corpus/python-docs/tutorial"
    cfg = {
        "job": "pretrain",
        "model_name_or_path": "minilm-l6",
        "output_dir": str(tmp / "out"),
        "data": {
            "train_files": [str(corpus / "*.rst.txt")],
            "max_seq_length": 64,
            "eval_fraction": 0.1,
            "prepared_root": str(tmp / "prepared"),
        },
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 32,
            "learning_rate": 3e-4,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_steps": 4,
            "seed": 7,
            "bf16": False,  # runs compared: one dtype, not training.bf16: auto's pick
        },
    }
    path = tmp / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(path)]) == 0
    return tmp, path, cfg


@pytest.mark.slow
def test_loss_falls_and_perplexity_improves(finished_run):
    tmp, _, _ = finished_run
    out = tmp / "out"
    m = json.loads((out / "metrics.json").read_text())
    losses = _losses(out)
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3
    assert m["eval_after"]["perplexity"] < m["eval_before"]["perplexity"]
    assert m["eval_after"]["masked_accuracy"] > m["eval_before"]["masked_accuracy"]
    assert m["global_step"] == 8 and m["tokens_per_second"] > 0 and m["peak_rss_mb"] > 0
    assert m["sparse_mlm_head"] is True
    for name in ("model.safetensors", "tokenizer.json", "config.json", "report.md", "loss.png", "config.resolved.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "weights must be safetensors"


@pytest.mark.slow
def test_saved_model_reloads_offline(finished_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = finished_run[0] / "out"
    model = AutoModelForMaskedLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert (tensor == saved[name]).all(), name
    ids = tok("The for statement iterates over a [MASK].", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == tok.vocab_size


@pytest.mark.slow
def test_classifier_from_the_output_keeps_the_source_pooler(finished_run, minilm_path):
    """MLM drops the pooler; the job carries it over so fine-tuning does not start from a random one."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    source = load_file(str(Path(minilm_path) / "model.safetensors"))
    pooler = AutoModelForSequenceClassification.from_pretrained(finished_run[0] / "out", num_labels=2).bert.pooler
    assert torch.equal(pooler.dense.weight.detach(), source["pooler.dense.weight"])
    assert torch.equal(pooler.dense.bias.detach(), source["pooler.dense.bias"])


@pytest.mark.slow
def test_preempted_run_resumes_at_the_right_step(finished_run, monkeypatch):
    """Ask for a checkpoint at step 3 (the flag file the Slurm signal path uses), exit 75, resume, finish."""
    tmp, path, cfg = finished_run
    out = tmp / "preempted"
    preempt_at(monkeypatch, 3)
    args = ["pretrain", "--config", str(path), f"output_dir={out}"]
    assert main(args) == preempt.REQUEUE_EXIT
    assert newest_complete_checkpoint(out).name == "checkpoint-3"
    assert not (out / "metrics.json").exists()

    assert main(args) == 2  # unfinished run, no resume: refused
    read = []
    real_getitem = Blocks.__getitem__
    monkeypatch.setattr(Blocks, "__getitem__", lambda self, i: (read.append(i), real_getitem(self, i))[1])
    assert main([*args, "resume=auto"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == 8 and m["resumed_from"].endswith("checkpoint-3")
    # Seen batches are skipped by index: the resumed run read the 5 new batches of 8 blocks, in order, and
    # nothing before them (accelerate's loader reads one batch ahead: at most 8 more).
    assert read[:40] == list(range(3 * 8, 8 * 8)) and len(read) <= 48
    # Same steps, same losses as the uninterrupted run (observed on CPU: identical at the logged 4 decimals).
    a, b = _losses(tmp / "out"), _losses(out)
    assert sorted(b) == sorted(a) == list(range(1, 9))
    assert b == pytest.approx(a, abs=1e-4)


@pytest.mark.slow
def test_scratch_init_trains_its_own_vocab(tmp_path, pretrain_config):
    path, cfg = pretrain_config
    cfg["init"] = "scratch"
    cfg["scratch"] = {
        "vocab_size": 500,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    cfg["training"]["max_steps"] = 4
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(path)]) == 0
    out = Path(cfg["output_dir"])
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] <= 500
    assert (out / "scratch-tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, pretrain_config):
    path, cfg = pretrain_config
    # A process group never tokenizes (it refuses): prepare is its own step, from the same data section.
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump({"job": "prepare", "data_from": str(path)}))
    assert main(["prepare", "--config", str(tmp_path / "prepare.yaml")]) == 0
    proc = torchrun(["pretrain", "--config", str(path), "training.max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((Path(cfg["output_dir"]) / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_step"] == 4
    assert "[rank 1]" in proc.stdout and "[rank 0]" in proc.stdout
    assert m["replicas_identical"] is True  # the ranks trained as one data-parallel run
    assert "find_unused_parameters" not in proc.stdout + proc.stderr  # DDP's per-step search is off


def test_prepared_order_sampler_reads_in_order_then_reshuffles_per_epoch():
    from hpcnlp.train.harness import PreparedOrderSampler

    sampler = PreparedOrderSampler(50, seed=7)
    assert list(sampler) == list(range(50))  # epoch 0: the prepared (already shuffled) order
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    again = PreparedOrderSampler(50, seed=7)
    again.set_epoch(1)
    assert list(again) == first  # drawn from (seed, epoch) alone: a resumed run sees the same batches
    sampler.set_epoch(2)
    assert list(sampler) != first


@pytest.mark.slow
def test_zero3_from_a_saved_model_under_torchrun_on_cpu_trains_as_ddp(tmp_path):
    """jobs/deepspeed/zero3.json with a saved model, 2 processes on CPU: from_pretrained runs DeepSpeed's
    zero.Init, which took the world for one process and refused the batch sizes until the run set up
    DeepSpeed's comm first. Dropout off (it draws from the global RNG, which the DDP run's evaluation
    before training moves): then ZeRO-3 and DDP see the same batches and masks and give the same losses."""
    from helpers import CORPUS, tiny_bert_without_dropout, write_config

    tiny_bert_without_dropout(tmp_path / "tiny-bert")
    path = write_config(
        tmp_path / "tiny.yaml",
        {
            "job": "pretrain",
            "model_name_or_path": str(tmp_path / "tiny-bert"),
            "tokenizer_name_or_path": "minilm-l6",
            "output_dir": str(tmp_path / "out"),
            "data": {
                "train_files": [str(CORPUS / "tutorial" / "introduction.rst.txt")],
                "max_seq_length": 32,
                "eval_fraction": 0.1,
                "prepared_root": str(tmp_path / "prepared"),
            },
            "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "seed": 11},
        },
    )
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump({"job": "prepare", "data_from": str(path)}))
    assert main(["prepare", "--config", str(tmp_path / "prepare.yaml")]) == 0
    metrics = {}
    for name, extra in (("ddp", []), ("zero3", [f"training.deepspeed={REPO / 'jobs/deepspeed/zero3.json'}"])):
        proc = torchrun(["pretrain", "--config", str(path), f"output_dir={tmp_path / name}", *extra])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert metrics["zero3"]["world_size"] == 2
    assert metrics["zero3"]["train_loss"] == pytest.approx(metrics["ddp"]["train_loss"], abs=1e-4)
    assert metrics["zero3"]["eval_after"]["loss"] == pytest.approx(metrics["ddp"]["eval_after"]["loss"], abs=1e-4)
