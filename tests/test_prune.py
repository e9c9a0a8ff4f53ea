"""`hpcnlp prune`: heads and FFN neurons removed by importance; the result is a plain, smaller model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SENTIMENT_DATA, export_config, preempt_at, run_cli, validate_config, write_config

from hpcnlp.jobs import prune


def prune_config(tmp_path, model: str, **top):
    return write_config(
        tmp_path / "prune.yaml",
        {
            "job": "prune",
            "model_name_or_path": model,
            "output_dir": str(tmp_path / "pruned"),
            "keep_heads": 30,
            "intermediate_size": 512,
            "importance_samples": 64,
            "data": {**SENTIMENT_DATA, "max_train_samples": 128, "max_eval_samples": 128},
            "latency": {"batch_sizes": [1], "seq_length": 32, "repeats": 2, "warmup": 1},
            "training": {
                "max_steps": 8,
                "per_device_train_batch_size": 16,
                "learning_rate": 5e-5,
                "seed": 3,
                "eval_strategy": "no",
                "save_strategy": "no",
                "logging_steps": 4,
            },
            **top,
        },
    )


@pytest.mark.slow
def test_prune_with_teacher_reloads_exports_and_passes_the_gate(sentiment_teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = prune_config(tmp_path, sentiment_teacher, teacher=sentiment_teacher)
    assert run_cli("prune", "--config", str(cfg)) == 0
    out = tmp_path / "pruned"
    model = AutoModelForSequenceClassification.from_pretrained(out)  # no custom code: config.json says it all
    layers = model.bert.encoder.layer
    assert sum(layer.attention.self.num_attention_heads for layer in layers) == 30
    assert all(layer.attention.self.num_attention_heads >= 1 for layer in layers)
    assert {layer.intermediate.dense.out_features for layer in layers} == {512}
    assert {layer.output.dense.in_features for layer in layers} == {512}
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["heads"] == 30 and m["original"]["heads"] == 72
    assert m["parameter_ratio"] < 0.8 and m["teacher"] == sentiment_teacher
    plan = json.loads((out / "prune_plan.json").read_text())
    assert sum(len(v) for v in plan["prune_heads"].values()) == 72 - 30

    assert run_cli("export", "--config", str(export_config(tmp_path, str(out)))) == 0
    rc = run_cli(
        "validate", "--config", str(validate_config(tmp_path, str(out), str(tmp_path / "onnx"), SENTIMENT_DATA))
    )
    assert rc == 0
    report = json.loads((tmp_path / "artifacts" / "test-model" / "1" / "validation.json").read_text())
    assert report["parity"]["onnx_fp32"]["max_abs_diff"]["logits"] <= 1e-4


@pytest.mark.slow
def test_prune_resumed_after_preemption_rebuilds_the_same_model(sentiment_teacher, tmp_path, monkeypatch):
    cfg = prune_config(tmp_path, sentiment_teacher)
    settings = ["training.save_strategy=steps", "training.save_steps=8"]
    with monkeypatch.context() as m:
        preempt_at(m, 3)
        assert run_cli("prune", "--config", str(cfg), *settings) == 75
    plan = (tmp_path / "pruned" / "prune_plan.json").read_text()
    assert run_cli("prune", "--config", str(cfg), *settings, "resume=auto") == 0  # loads checkpoint-3: same shapes
    assert (tmp_path / "pruned" / "prune_plan.json").read_text() == plan
    m = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    assert m["resumed_from"].endswith("checkpoint-3") and m["global_step"] == 8 and m["pruned"]["heads"] == 30


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        num_labels=2,
    )
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(prune.LAYOUT))
def test_plan_applies_and_the_pruned_model_reloads_with_automodel(model_type, tmp_path):
    """Every supported architecture: uneven heads per layer, one FFN width; save -> AutoModelFor... gives
    the same logits (config.json carries pruned_heads and the new width)."""
    from transformers import AutoModelForSequenceClassification

    model = _tiny(model_type)
    heads = [[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 9.0]]
    ffn = [list(range(64)), list(range(64, 0, -1))]
    p = json.loads(json.dumps(prune.plan(model, heads, ffn, keep_heads=3, intermediate_size=16)))
    assert sum(len(v) for v in p["prune_heads"].values()) == 8 - 3
    assert all(str(i) in p["prune_heads"] for i in range(2))  # both layers lose heads, each keeps one or more
    assert p["keep_neurons"]["0"] == list(range(48, 64)) and p["keep_neurons"]["1"] == list(range(16))
    prune.apply_plan(model, p)
    assert prune.head_count(model) == 3
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)
    assert prune.head_count(again) == 3


def test_importance_scores_every_head_and_neuron():
    from datasets import Dataset

    model = _tiny("bert")
    ds = Dataset.from_dict(
        {"input_ids": [[2, 5, 6, 7, 3], [2, 9, 3]] * 4, "attention_mask": [[1] * 5, [1] * 3] * 4, "labels": [0, 1] * 4}
    )
    heads, ffn = prune.importance(model, ds, samples=8, seed=0, pad_id=0)
    assert [len(h) for h in heads] == [4, 4] and [len(f) for f in ffn] == [64, 64]
    assert all(s > 0 for h in heads for s in h)
    assert not any(p.grad is not None for p in model.parameters())  # gradients dropped after each batch


@pytest.mark.slow
def test_check_refuses_impossible_sizes(sentiment_teacher, tmp_path, capsys):
    cfg = prune_config(tmp_path, sentiment_teacher)
    assert run_cli("check", "--config", str(cfg), "keep_heads=3", "intermediate_size=4096") == 2
    err = capsys.readouterr().err
    assert "keep_heads: the model has 72 heads in 6 layers" in err and "intermediate_size" in err
    assert run_cli("check", "--config", str(cfg)) == 0
    assert not (tmp_path / "pruned").exists()


def test_shipped_prune_config_parses():
    """jobs/prune.yaml: every key known and typed (its model comes from jobs/finetune-sentiment.yaml)."""
    from helpers import REPO

    from hpcnlp.jobs import load_config

    cfg = load_config(REPO / "jobs" / "prune.yaml", check=False)
    assert cfg.job == "prune" and cfg.keep_heads == 36 and cfg.intermediate_size == 768
