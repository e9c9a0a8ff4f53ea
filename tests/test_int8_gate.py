"""The int8 part of `hpcnlp validate`: the recipe search, the fp32 / reject fallback, edge-case inputs and
out-of-domain eval files. Real MiniLM sentiment teacher and its export (session fixtures, conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import SENTIMENT, SENTIMENT_DATA, run_cli, validate_config

pytestmark = pytest.mark.slow  # each test validates a real model

SMALL_EVAL = {**SENTIMENT_DATA, "max_eval_samples": 64}
STRICT = {"int8_min_argmax_agreement": 1.0}  # no flip at all on 64 examples: the export's dynamic int8 misses it
EDGE_CASES = {"empty", "whitespace only", "one character", "emoji", "CJK", "Arabic", "far over max length"}


def _bundle(tmp_path: Path) -> Path:
    return tmp_path / "artifacts" / "test-model" / "1"


def test_shipped_bundle_records_the_recipe_and_edge_cases(sentiment_bundle):
    """The default gate (flip rate <= 3%) on the shared bundle: the recipe that passed, its batch-1 latency
    in validation.json and the manifest; every edge case through PyTorch, ONNX fp32 and int8."""
    report = json.loads((sentiment_bundle / "validation.json").read_text())
    int8 = report["int8"]
    assert int8["attempts"][0]["recipe"] == int8["exported_recipe"] == "dynamic"
    assert int8["recipe"] == int8["attempts"][-1]["recipe"] and int8["attempts"][-1]["passed"]
    assert all(not a["passed"] for a in int8["attempts"][:-1])  # the search stops at the first that passes
    assert int8["latency_b1_p50_ms"] > 0 and int8["attempts"][-1]["argmax_agreement"] >= 0.97
    manifest = json.loads((sentiment_bundle / "manifest.json").read_text())
    assert manifest["int8"]["recipe"] == int8["recipe"] and manifest["int8"]["latency_b1_p50_ms"] > 0
    assert manifest["thresholds"]["int8_min_argmax_agreement"] == 0.97

    cases = {c["case"]: c for c in report["edge_cases"]}
    assert set(cases) == EDGE_CASES
    assert cases["empty"]["tokens"] == cases["whitespace only"]["tokens"] == 2  # [CLS] [SEP]
    assert cases["far over max length"]["tokens"] == SENTIMENT_DATA["max_seq_length"]  # truncated, not failed
    for c in cases.values():
        assert c["onnx_fp32"]["max_abs_diff"] <= 1e-4 and c["onnx_fp32"]["agree"] == c["onnx_fp32"]["compared"]
        assert "agree" in c["onnx_int8"] and "error" not in c["onnx_int8"]
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["edge cases: fp32 max abs diff (logits)"]["passed"]
    assert checks["int8 argmax agreement (edge cases)"]["passed"]
    md = (sentiment_bundle / "validation.md").read_text()
    assert "## int8 recipes tried" in md and "## Edge cases (gated)" in md and "这部电影" in md
    assert all(f"| {a['recipe']} |" in md for a in int8["attempts"])
    assert "ONNX int8 vs fp32 (p50): batch 1 " in md  # this machine's speed-up, whichever it is


def test_strict_limit_moves_the_search_to_a_later_recipe(sentiment_teacher, sentiment_onnx, tmp_path):
    """No flip allowed: the export's dynamic int8 fails; the search goes on (per-channel, static QDQ, then
    sensitive MatMuls). Either a later recipe ships as model.int8.onnx, or fp32 ships alone with the reason."""
    import onnx

    cfg = validate_config(
        tmp_path,
        sentiment_teacher,
        sentiment_onnx,
        SMALL_EVAL,
        thresholds=STRICT,
        int8_search={"calibration_samples": 16},
    )
    rc = run_cli("validate", "--config", str(cfg))
    assert rc == 0
    report = json.loads((_bundle(tmp_path) / "validation.json").read_text())
    int8 = report["int8"]
    first = int8["attempts"][0]
    assert first["recipe"] == "dynamic" and not first["passed"]
    assert "int8 argmax agreement (eval set)" in first["failed"]
    assert [a["recipe"] for a in int8["attempts"][1:3]] == ["dynamic per-channel", "static QDQ per-channel"]
    assert not list(tmp_path.glob("artifacts/.int8-search-*"))  # the candidates are cleaned up
    if int8["recipe"]:
        assert int8["recipe"] != "dynamic" and int8["attempts"][-1]["argmax_agreement"] == 1.0
        graph = onnx.load(str(_bundle(tmp_path) / "model.int8.onnx")).graph
        fp32_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
        assert set(int8["fp32_nodes"]) <= fp32_matmuls  # the nodes kept out of quantization are plain MatMuls
        assert {f"{n}/split/MatMul" for n in int8["split_nodes"]} <= fp32_matmuls  # a split one's outlier side
        blockwise = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(blockwise) == len(int8["blockwise_nodes"])
        assert report["metrics"]["onnx_int8"] == int8["attempts"][-1]["metrics"]
    else:
        assert "no int8 recipe passed" in int8["reason"] and not (_bundle(tmp_path) / "model.int8.onnx").exists()


def test_no_recipe_passes_fp32_ships_with_the_reason(sentiment_teacher, sentiment_onnx, tmp_path):
    cfg = validate_config(
        tmp_path, sentiment_teacher, sentiment_onnx, SMALL_EVAL, thresholds=STRICT, int8_search={"max_attempts": 1}
    )
    assert run_cli("validate", "--config", str(cfg)) == 0
    bundle = _bundle(tmp_path)
    assert not (bundle / "model.int8.onnx").exists() and (bundle / "model.onnx").is_file()
    report = json.loads((bundle / "validation.json").read_text())
    int8 = report["int8"]
    assert int8["recipe"] is None and [a["recipe"] for a in int8["attempts"]] == ["dynamic", "dynamic per-channel"]
    assert "no int8 recipe passed (2 tried; search stopped: max_attempts (1) reached)" in int8["reason"]
    assert "onnx_int8" not in report["metrics"] and "onnx_int8" not in report["latency"]
    row = next(c for c in report["checks"] if c["check"] == "int8: a recipe within the limits")
    assert row["passed"] and row["limit"] == "int8_fallback: fp32" and row["measured"] == int8["reason"]
    assert "No int8 model ships" in (bundle / "validation.md").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["int8"]["recipe"] is None and manifest["int8"]["reason"] == int8["reason"]
    assert "model.int8.onnx" not in manifest["files"]
    assert run_cli("verify", str(bundle)) == 0


def test_no_recipe_passes_reject(sentiment_teacher, sentiment_onnx, tmp_path):
    cfg = validate_config(
        tmp_path,
        sentiment_teacher,
        sentiment_onnx,
        SMALL_EVAL,
        thresholds={**STRICT, "int8_fallback": "reject"},
        int8_search={"max_attempts": 1},
    )
    assert run_cli("validate", "--config", str(cfg)) == 3  # status.EXIT_REJECTED
    assert not (tmp_path / "artifacts" / "test-model").exists()
    rejected = tmp_path / "rejected" / "test-model" / "1"
    assert (rejected / "model.int8.onnx").is_file()  # the export's int8, kept for a look
    report = json.loads((rejected / "validation.json").read_text())
    assert [c["check"] for c in report["checks"] if not c["passed"]] == ["int8: a recipe within the limits"]
    assert "no int8 recipe passed" in report["int8"]["reason"]


def _pairs(src: Path, dest: Path, rows: int) -> str:
    """A sentence-pair file from the sentiment data: each review split in two halves."""
    frame = pd.read_csv(src).head(rows)
    words = frame["text"].str.split()
    frame = frame.assign(
        text=words.map(lambda w: " ".join(w[: len(w) // 2]) or "."),
        second=words.map(lambda w: " ".join(w[len(w) // 2 :])),
    )
    frame[["text", "second", "label"]].to_csv(dest, index=False)
    return str(dest)


def test_text_pairs_edge_cases_and_out_of_domain_eval(sentiment_teacher, sentiment_onnx, tmp_path):
    """data.text_pair_column: eval and edge cases go in as pairs; an extra eval file is scored beside the
    in-domain one in validation.md (reported, not gated)."""
    data = {
        "train_file": _pairs(SENTIMENT / "train.csv", tmp_path / "train.csv", 200),
        "validation_file": _pairs(SENTIMENT / "validation.csv", tmp_path / "validation.csv", 64),
        "extra_eval_files": {"critics-test": _pairs(SENTIMENT / "test.csv", tmp_path / "test.csv", 48)},
        "text_pair_column": "second",
        "max_seq_length": 48,
    }
    cfg = validate_config(tmp_path, sentiment_teacher, sentiment_onnx, data, int8_search={"max_attempts": 0})
    assert run_cli("validate", "--config", str(cfg)) == 0  # int8 ships or not (fallback fp32): fp32 passes
    bundle = _bundle(tmp_path)
    report = json.loads((bundle / "validation.json").read_text())
    cases = {c["case"]: c for c in report["edge_cases"]}
    assert set(cases) == EDGE_CASES | {"text pair, second far over max length"}
    assert cases["empty"]["tokens"] > 3  # [CLS] [SEP], the second text, [SEP]
    assert cases["text pair, second far over max length"]["tokens"] == 48
    assert all(c["pair"] for c in cases.values())
    assert all(c["onnx_fp32"]["max_abs_diff"] <= 1e-4 for c in cases.values())
    extra = report["extra_eval"]["critics-test"]
    assert extra["examples"] == 48 and set(extra["metrics"]) >= {"pytorch", "onnx_fp32"}
    md = (bundle / "validation.md").read_text()
    section = md.split("## Out-of-domain eval sets (reported, not gated)")[1]
    assert "| in-domain |" in section and "| critics-test |" in section
    assert not any("critics-test" in c["check"] for c in report["checks"])  # reported, not gated


def test_sensitivity_ranking_finds_the_matmuls_that_int8_hurts(sentiment_onnx, tmp_path):
    """BERT's FFN output projections take the GELU outputs (wide range, outliers): per-tensor int8 hurts
    them most. Keeping the top-ranked one in fp32, or quantizing it blockwise, brings the int8 logits closer
    to fp32; blockwise needs a constant weight (attention's activation x activation MatMuls have none)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from hpcnlp.ship.int8_search import constant_weight_matmuls, sensitive_matmuls
    from hpcnlp.ship.quantize import BLOCKWISE_MARGIN, Quantizer, Recipe, blockwise_probe

    fp32, int8 = Path(sentiment_onnx) / "model.onnx", Path(sentiment_onnx) / "model.int8.onnx"
    texts = pd.read_csv(SENTIMENT / "validation.csv")["text"].head(32).tolist()
    enc = AutoTokenizer.from_pretrained(sentiment_onnx)(
        texts, padding=True, truncation=True, max_length=48, return_tensors="np"
    )
    feeds = [{k: v.astype(np.int64) for k, v in enc.items()}]
    ranked = sensitive_matmuls(fp32, int8, feeds)
    assert len(ranked) == 48 and ranked[0][1] > ranked[-1][1]  # 6 layers x (Q, K, V, 2 attention, out, FFN 2)
    assert ranked[0][0].endswith("output/dense/MatMul") and "attention" not in ranked[0][0]

    quantize = Quantizer(fp32, "avx2")
    kept = quantize(Recipe(fp32_nodes=(ranked[0][0],)), tmp_path / "kept.onnx")
    blockwise = quantize(Recipe(per_channel=True, blockwise_nodes=(ranked[0][0],)), tmp_path / "blockwise.onnx")
    ops = [n.op_type for n in onnx.load(str(blockwise)).graph.node]
    int8_ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulInteger") == int8_ops.count("MatMulInteger") - 1
    constant = constant_weight_matmuls(fp32)
    assert len(constant) == 36 and ranked[0][0] in constant and not any("attention/self/MatMul" in n for n in constant)
    probe = blockwise_probe(fp32, ranked[0][0], 16, 1)  # this machine's answer, whichever it is
    assert probe["fp32_us"] > 0 and probe["blockwise_us"] > 0
    assert probe["blockwise"] == (probe["fp32_us"] >= BLOCKWISE_MARGIN * probe["blockwise_us"] - 1)
    with pytest.raises(ValueError, match="0 of 1 MatMuls"):
        quantize(Recipe(blockwise_nodes=(next(n for n, _ in ranked if n not in constant),)), tmp_path / "x.onnx")

    def logits(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds[0])[0]

    exact = logits(fp32)
    assert np.abs(logits(kept) - exact).mean() < np.abs(logits(int8) - exact).mean()
    assert np.abs(logits(blockwise) - exact).mean() < np.abs(logits(int8) - exact).mean()
    # Optimum's side files stay in its scratch dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blockwise.onnx", "kept.onnx"]


def test_split_matmul_keeps_int8_speed_and_fp32_outliers(sentiment_onnx, tmp_path):
    """Layer 0's FFN output takes one GELU channel far above the rest (the packaged MiniLM's, kept by fine-tuning):
    outlier_inputs finds it; the split graph is the same function in fp32; quantized, the split MatMul's int8
    part stays int8 and the logits come closer to fp32 than plain per-tensor int8."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from hpcnlp.ship.int8_search import outlier_inputs
    from hpcnlp.ship.quantize import MAX_OUTLIER_FRACTION, Quantizer, Recipe, split_outliers

    fp32, int8 = Path(sentiment_onnx) / "model.onnx", Path(sentiment_onnx) / "model.int8.onnx"
    texts = pd.read_csv(SENTIMENT / "validation.csv")["text"].head(32).tolist()
    enc = AutoTokenizer.from_pretrained(sentiment_onnx)(
        texts, padding=True, truncation=True, max_length=48, return_tensors="np"
    )
    feeds = [{k: v.astype(np.int64) for k, v in enc.items()}]
    ffn0, query0 = "/bert/encoder/layer.0/output/dense/MatMul", "/bert/encoder/layer.0/attention/self/query/MatMul"
    found = outlier_inputs(fp32, [ffn0, query0], feeds)
    assert ffn0 in found and 1 <= len(found[ffn0]) <= 1536 * MAX_OUTLIER_FRACTION
    assert query0 not in found  # LayerNorm's output: no channel 6x the median's range

    def logits(model):
        model = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["logits"], feeds[0])[0]

    model = onnx.load(str(fp32))
    side = split_outliers(model, ((ffn0, found[ffn0]),))
    onnx.checker.check_model(model)
    assert side == [f"{ffn0}/split/Gather", f"{ffn0}/split/MatMul"]
    exact = logits(fp32)
    assert np.abs(logits(model.SerializeToString()) - exact).max() < 1e-4  # the same product, regrouped

    split = Quantizer(fp32, "avx2")(Recipe(split_nodes=((ffn0, found[ffn0]),)), tmp_path / "split.onnx")
    ops = [n.op_type for n in onnx.load(str(split)).graph.node]
    int8_ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("MatMul") == int8_ops.count("MatMul") + 1  # the outlier side, in fp32
    assert ops.count("MatMulInteger") == int8_ops.count("MatMulInteger")  # the rest of the split MatMul: int8
    assert np.abs(logits(split) - exact).mean() < np.abs(logits(int8) - exact).mean()
    with pytest.raises(ValueError, match="dynamic"):
        Quantizer(fp32, "avx2")(Recipe(static=True, split_nodes=((ffn0, found[ffn0]),)), tmp_path / "x.onnx")
