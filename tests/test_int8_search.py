"""The int8 recipe search's order and its sensitive-MatMul form, with fakes for quantizing and measuring
(the real search on a real model: test_int8_gate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcnlp.ship import int8_search
from hpcnlp.ship.quantize import Recipe

RANKED = ["attention/self/MatMul", "layer.0/output/dense/MatMul", "layer.1/output/dense/MatMul"]
CONSTANT = {"layer.0/output/dense/MatMul", "layer.1/output/dense/MatMul"}  # attention's product has no weight


def _search(monkeypatch, tmp_path, pays: bool, passes_at: int):
    """Search where a recipe passes once it has `passes_at` sensitive MatMuls; blockwise pays or not."""
    monkeypatch.setattr(int8_search, "sensitive_matmuls", lambda *a: [(n, 1.0) for n in RANKED])
    monkeypatch.setattr(int8_search, "constant_weight_matmuls", lambda fp32: CONSTANT)
    made: dict[Path, Recipe] = {}

    class FakeQuantizer:
        fp32 = tmp_path / "model.onnx"

        def __call__(self, recipe, dest):
            made[dest] = recipe
            return dest

    asked = []

    def blockwise_pays(node):
        asked.append(node)
        return pays

    def measure(path):
        n = len(int8_search.sensitive(made[path])) if path in made else 0
        return {"passed": n >= passes_at, "argmax_agreement": 0.9 + 0.01 * n}

    tried, chosen, why = int8_search.search(
        Recipe(),
        tmp_path / "exported.onnx",
        FakeQuantizer(),
        measure,
        tmp_path,
        max_attempts=6,
        max_seconds=60,
        max_sensitive_nodes=3,
        rank_feeds=list,
        blockwise_pays=blockwise_pays,
    )
    return [a.recipe for a in tried], chosen, why, asked


@pytest.mark.parametrize("pays", [True, False])
def test_sensitive_matmuls_are_blockwise_only_where_it_pays(monkeypatch, tmp_path, pays):
    recipes, chosen, why, asked = _search(monkeypatch, tmp_path, pays, passes_at=2)
    assert why == "passed" and chosen.recipe == recipes[-1]
    assert recipes[:3] == [Recipe(), Recipe(per_channel=True), Recipe(static=True, per_channel=True)]
    assert asked == ["layer.0/output/dense/MatMul"]  # once, the most sensitive MatMul blockwise could take
    one, two = recipes[3:]
    assert one.fp32_nodes == ("attention/self/MatMul",) and one.blockwise_nodes == ()  # no weight: fp32 always
    if pays:
        assert two.fp32_nodes == ("attention/self/MatMul",)
        assert two.blockwise_nodes == ("layer.0/output/dense/MatMul",)
        assert two.name == "dynamic + 1 MatMul(s) blockwise + 1 MatMul(s) in fp32"
    else:
        assert two.fp32_nodes == tuple(RANKED[:2]) and two.blockwise_nodes == ()


def test_search_stops_at_its_sensitive_node_budget(monkeypatch, tmp_path):
    recipes, chosen, why, _ = _search(monkeypatch, tmp_path, True, passes_at=4)
    assert chosen is None and why == "max_sensitive_nodes (3) given more precision"
    assert len(recipes) == 6  # the export's, per-channel, static, then 1, 2 and 3 sensitive MatMuls
    assert recipes[-1].fp32_nodes == (RANKED[0],) and recipes[-1].blockwise_nodes == tuple(RANKED[1:])
