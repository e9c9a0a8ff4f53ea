"""The shipped bundle: manifest, `hpcnlp verify`, and torch-free inference with the bundled script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, SENTIMENT, run_cli

pytestmark = pytest.mark.slow  # needs the exported, validated sentiment bundle (session fixture)

# Runs a script with torch and transformers made unimportable: any import of them raises ImportError.
NO_TORCH = ("import runpy, sys; sys.modules.update(torch=None, transformers=None, optimum=None); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_bundle_contents_and_manifest(sentiment_bundle):
    names = {p.name for p in sentiment_bundle.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json", "manifest.json", "MODEL_CARD.md",
            "validation.md", "validation.json", "latency.png", "onnx_inference.py"} <= names
    manifest = json.loads((sentiment_bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    assert manifest["opset"] == 17 and manifest["passed"] is True
    assert manifest["packages"]["onnxruntime"] and manifest["packages"]["torch"]
    assert len(manifest["source_model"]["sha256"]) == 64 and manifest["id2label"] == {"0": "fresh", "1": "rotten"}
    assert manifest["thresholds"]["fp32_atol"] == 1e-4 and manifest["checks"]
    assert "git_commit" in manifest and "slurm_job_id" in manifest
    assert "python onnx_inference.py" in (sentiment_bundle / "MODEL_CARD.md").read_text()


def test_verify_passes_then_catches_a_modified_file(sentiment_bundle, tmp_path, capsys):
    assert run_cli("verify", str(sentiment_bundle)) == 0
    copy = tmp_path / "bundle"
    shutil.copytree(sentiment_bundle, copy)
    with open(copy / "model.int8.onnx", "r+b") as f:  # one byte flipped, same size
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (copy / "extra.txt").write_text("added after shipping")
    capsys.readouterr()
    assert run_cli("verify", str(copy)) == 1
    err = capsys.readouterr().err
    assert "model.int8.onnx: sha256 differs" in err and "extra.txt: not in the manifest" in err
    assert "model.onnx" not in err.replace("model.int8.onnx", "")


def test_verify_catches_an_unloadable_model(sentiment_bundle, tmp_path):
    """Checksums can be recomputed by whoever broke the file; loadability is checked too."""
    from hpcnlp import bundle

    copy = tmp_path / "bundle"
    shutil.copytree(sentiment_bundle, copy)
    (copy / "model.onnx").write_bytes(b"not an onnx file")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": bundle.sha256(copy / "model.onnx"), "bytes": 16}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = bundle.verify(copy)
    assert len(problems) == 1 and "model.onnx: does not load" in problems[0]


def test_torch_free_script_gives_pytorch_labels(sentiment_bundle, sentiment_teacher):
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = pd.read_csv(SENTIMENT / "test.csv")["text"].head(12).tolist()
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(sentiment_bundle / "onnx_inference.py"),
                           str(sentiment_bundle), *texts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line)["label"] for line in proc.stdout.splitlines()]

    tok = AutoTokenizer.from_pretrained(sentiment_teacher)
    model = AutoModelForSequenceClassification.from_pretrained(sentiment_teacher).eval()
    with torch.inference_mode():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits
    assert got == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_blocked_import_really_blocks(tmp_path):
    """The NO_TORCH wrapper must make `import torch` fail, or the test above proves nothing."""
    script = tmp_path / "s.py"
    script.write_text("import torch\n")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(script)], capture_output=True, text=True)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_bundled_script_is_the_example():
    from hpcnlp.bundle import EXAMPLE

    assert EXAMPLE == REPO / "examples" / "onnx_inference.py" and EXAMPLE.is_file()


def test_pipeline_stage_row_reads_the_bundle(sentiment_bundle):
    """The last line of `make demo`'s table: gate verdict, metric per runtime, sizes, latency."""
    from hpcnlp.jobs import load_config
    from hpcnlp.submit import stage_row

    cfg = load_config(str(sentiment_bundle.parents[2] / "validate.yaml"), check=False)
    row = stage_row("validate", cfg)
    assert row["metric"].startswith("PASSED: pytorch 0.") and "onnx_int8 0." in row["metric"], row
    assert row["size"].count("MB") == 2 and "onnx_int8" in row["latency b1 p50"]
    assert row["output"] == str(sentiment_bundle)
