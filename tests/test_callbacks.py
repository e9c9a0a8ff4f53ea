"""The training log a user watches: each evaluation's metrics, on rank 0 only."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from hpcnlp.train.callbacks import ThroughputCallback


def _evaluate(caplog, zero: bool) -> list[str]:
    state = SimpleNamespace(global_step=641, max_steps=1923, epoch=1.0, is_world_process_zero=zero)
    metrics = {
        "eval_loss": 0.38481,
        "eval_f1": 0.83304,
        "eval_accuracy": 0.8378,
        "eval_runtime": 12.3,
        "eval_samples_per_second": 104.2,
        "epoch": 1.0,
    }
    with caplog.at_level(logging.INFO, logger="hpcnlp.train"):
        ThroughputCallback(16).on_evaluate(None, state, None, metrics=metrics)
    return [r.getMessage() for r in caplog.records if r.name == "hpcnlp.train"]


def test_each_evaluation_is_logged_with_its_metrics(caplog):
    assert _evaluate(caplog, zero=True) == ["eval at step 641/1923 (epoch 1.00): loss 0.3848 f1 0.833 accuracy 0.8378"]


def test_other_ranks_stay_quiet(caplog):
    assert _evaluate(caplog, zero=False) == []
