"""The int8 recipe search's order and its sensitive-MatMul form, with fakes for quantizing and measuring
(the real search on a real model: test_int8_gate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcnlp.ship import int8_search
from hpcnlp.ship.quantize import Recipe

RANKED = ["attention/self/MatMul", "layer.0/output/dense/MatMul", "layer.1/output/dense/MatMul"]
CONSTANT = {"layer.0/output/dense/MatMul", "layer.1/output/dense/MatMul"}  # attention's product has no weight


def _search(monkeypatch, tmp_path, pays: bool, passes_at: int, outliers: dict | None = None, exported=Recipe()):
    """Search where a recipe passes once it has `passes_at` sensitive MatMuls; blockwise pays or not; `outliers`:
    what outlier_inputs finds (node -> channels)."""
    monkeypatch.setattr(int8_search, "sensitive_matmuls", lambda *a: [(n, 1.0) for n in RANKED])
    monkeypatch.setattr(int8_search, "constant_weight_matmuls", lambda fp32: CONSTANT)
    looked = []

    def outlier_inputs(fp32, nodes, feeds):
        looked.append(list(nodes))
        return {n: c for n, c in (outliers or {}).items() if n in nodes}

    monkeypatch.setattr(int8_search, "outlier_inputs", outlier_inputs)
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
        exported,
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
    assert looked == ([] if exported.static else [sorted(CONSTANT)])  # once, the constant-weight ones ranked
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


def test_outlier_inputs_split_their_matmul_before_blockwise_or_fp32(monkeypatch, tmp_path):
    """A sensitive MatMul with outlier input channels is split (those channels in fp32, the rest int8); the
    blockwise probe is asked of the next constant-weight one, and only then."""
    split = {"layer.0/output/dense/MatMul": (856,)}
    recipes, chosen, why, asked = _search(monkeypatch, tmp_path, True, passes_at=3, outliers=split)
    assert why == "passed" and asked == ["layer.1/output/dense/MatMul"]
    one, two, three = recipes[3:]
    assert one.fp32_nodes == ("attention/self/MatMul",) and not one.split_nodes
    assert two.split_nodes == (("layer.0/output/dense/MatMul", (856,)),) and not two.blockwise_nodes
    assert two.name == "dynamic + 1 MatMul(s) split (outlier channels in fp32) + 1 MatMul(s) in fp32"
    assert three.blockwise_nodes == ("layer.1/output/dense/MatMul",)
    assert int8_search.sensitive(three) == ("layer.0/output/dense/MatMul", *three.blockwise_nodes, *three.fp32_nodes)


def test_static_recipes_are_not_split(monkeypatch, tmp_path):
    """Static ranges are calibrated on the unsplit graph: a static base gets no split MatMuls."""
    static = Recipe(static=True, per_channel=True)
    split = {"layer.0/output/dense/MatMul": (856,)}
    recipes, _, _, _ = _search(monkeypatch, tmp_path, False, passes_at=2, outliers=split, exported=static)
    assert all(not r.split_nodes for r in recipes)


def test_validation_md_says_when_int8_is_not_faster():
    """validate's latency section: int8's speed-up over fp32, and a warning on a CPU where it has none (an AVX2-only
    EPYC measured 90.7 vs 89.9 ms: int8 buys size there, not speed)."""
    from hpcnlp.ship.report import int8_speedup

    def lat(fp32, int8):
        return {
            v: {"1": {"p50_ms": ms}, "32": {"p50_ms": 20 * ms}} for v, ms in (("onnx_fp32", fp32), ("onnx_int8", int8))
        }

    assert int8_speedup(lat(30.0, 12.0)) == "ONNX int8 vs fp32 (p50): batch 1 2.50x, batch 32 2.50x."
    slow = int8_speedup(lat(90.7, 89.9))
    assert slow.startswith("ONNX int8 vs fp32 (p50): batch 1 1.01x, batch 32 1.01x.")
    assert "not faster than fp32 on this CPU" in slow
    assert int8_speedup({"onnx_fp32": {"1": {"p50_ms": 30.0}}}) == ""  # fp32 shipped alone
