"""The shipped bundle: manifest, `hpcnlp verify`, and torch-free inference with the bundled script."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from helpers import REPO, SENTIMENT, SENTIMENT_DATA, run_cli, validate_config

pytestmark = pytest.mark.slow  # needs the exported, validated sentiment bundle (session fixture)

# Runs a script with torch and transformers made unimportable: any import of them raises ImportError.
NO_TORCH = (
    "import runpy, sys; sys.modules.update(torch=None, transformers=None, optimum=None); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_bundle_contents_and_manifest(sentiment_bundle):
    names = {p.name for p in sentiment_bundle.iterdir()}
    assert {
        "model.onnx",
        "model.int8.onnx",
        "config.json",
        "tokenizer.json",
        "manifest.json",
        "MODEL_CARD.md",
        "validation.md",
        "validation.json",
        "latency.png",
        "onnx_inference.py",
        "SHA256SUMS",
    } <= names
    manifest = json.loads((sentiment_bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json", "SHA256SUMS"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    assert manifest["opset"] == 17 and manifest["passed"] is True
    assert manifest["packages"]["onnxruntime"] and manifest["packages"]["torch"]
    assert len(manifest["source_model"]["sha256"]) == 64 and manifest["id2label"] == {"0": "fresh", "1": "rotten"}
    assert manifest["thresholds"]["fp32_atol"] == 1e-4 and manifest["checks"]
    assert "code_version" in manifest and "slurm_job_id" in manifest
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
    from hpcnlp.ship import bundle

    copy = tmp_path / "bundle"
    shutil.copytree(sentiment_bundle, copy)
    (copy / "model.onnx").write_bytes(b"not an onnx file")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": bundle.sha256(copy / "model.onnx"), "bytes": 16}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "SHA256SUMS").write_text(
        bundle.sums_text({**manifest["files"], "manifest.json": {"sha256": bundle.sha256(copy / "manifest.json")}})
    )
    problems = bundle.verify(copy)
    assert len(problems) == 1 and "model.onnx: does not load" in problems[0]


def test_torch_free_script_gives_pytorch_labels(sentiment_bundle, sentiment_teacher):
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = pd.read_csv(SENTIMENT / "test.csv")["text"].head(12).tolist()
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(sentiment_bundle / "onnx_inference.py"), str(sentiment_bundle), *texts],
        capture_output=True,
        text=True,
        timeout=120,
    )
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


def test_bundled_script_is_the_packages(sentiment_bundle):
    from importlib import resources

    assert (sentiment_bundle / "onnx_inference.py").read_bytes() == resources.files("hpcnlp.ship").joinpath(
        "onnx_inference.py"
    ).read_bytes()


def test_a_wheel_carries_the_bundled_script(tmp_path):
    """A non-editable install has no repository around it: the script must be inside the package."""
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("hpcnlp-*.whl")
    assert "hpcnlp/ship/onnx_inference.py" in zipfile.ZipFile(wheel).namelist()


def test_pipeline_stage_row_reads_the_bundle(sentiment_bundle):
    """The last line of `make demo`'s table: gate verdict, metric per runtime, sizes, latency."""
    from hpcnlp.cluster.pipeline import stage_row
    from hpcnlp.jobs import load_config

    cfg = load_config(str(sentiment_bundle.parents[2] / "validate.yaml"), check=False)
    row = stage_row("validate", cfg)
    assert row["metric"].startswith("PASSED: pytorch 0.") and "onnx_int8 0." in row["metric"], row
    assert row["size"].count("MB") == 2 and "onnx_int8" in row["latency b1 p50"]
    assert row["output"] == str(sentiment_bundle)


# --- verify: what a bundle must be -----------------------------------------------------------------
def _edited_copy(sentiment_bundle, tmp_path, edit):
    """A copy of the bundle whose manifest `edit` changed, SHA256SUMS rewritten to match (as whoever made
    the change could): only verify's rules can catch it."""
    from hpcnlp.ship import bundle

    copy = tmp_path / "bundle"
    shutil.copytree(sentiment_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "SHA256SUMS").write_text(
        bundle.sums_text({**manifest["files"], "manifest.json": {"sha256": bundle.sha256(copy / "manifest.json")}})
    )
    return copy


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_verify_refuses_names_outside_the_bundle(sentiment_bundle, tmp_path, how):
    from hpcnlp.ship import bundle

    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the bundle")

    def edit(copy, manifest):
        name = {"parent": "../outside.txt", "absolute": str(outside), "symlink": "outside.txt"}[how]
        if how == "symlink":
            (copy / name).symlink_to(outside)
        manifest["files"][name] = {"sha256": bundle.sha256(outside), "bytes": outside.stat().st_size}

    problems = bundle.verify(_edited_copy(sentiment_bundle, tmp_path, edit))
    assert problems and all("not a plain file name" in p or "resolves outside" in p for p in problems), problems


@pytest.mark.parametrize("name", ["model.onnx", "config.json", "tokenizer.json", "MODEL_CARD.md", "validation.json"])
def test_verify_requires_the_bundle_files(sentiment_bundle, tmp_path, name):
    from hpcnlp.ship import bundle

    def edit(copy, manifest):
        (copy / name).unlink()
        del manifest["files"][name]

    problems = bundle.verify(_edited_copy(sentiment_bundle, tmp_path, edit))
    assert problems == [f"{tmp_path / 'bundle' / 'manifest.json'}: does not list {name}, which every bundle has"]


def test_verify_refuses_a_rejected_bundle(sentiment_bundle, tmp_path):
    from hpcnlp.ship import bundle

    problems = bundle.verify(_edited_copy(sentiment_bundle, tmp_path, lambda c, m: m.update(passed=False)))
    assert len(problems) == 1 and "the gate did not pass" in problems[0]


def test_verify_refuses_an_empty_file_list(sentiment_bundle, tmp_path):
    from hpcnlp.ship import bundle

    def edit(copy, manifest):
        for name in manifest["files"]:
            (copy / name).unlink()
        manifest["files"] = {}

    assert bundle.verify(_edited_copy(sentiment_bundle, tmp_path, edit)) == [
        f"{tmp_path / 'bundle' / 'manifest.json'}: lists no files"
    ]


def test_sha256sum_checks_the_bundle_without_hpcnlp(sentiment_bundle, tmp_path):
    """coreutils' sha256sum -c: every file, manifest.json included; a changed byte fails."""
    ok = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=sentiment_bundle, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checked = {line.rsplit(": ", 1)[0] for line in ok.stdout.splitlines() if line.endswith(": OK")}
    assert checked == {p.name for p in sentiment_bundle.iterdir()} - {"SHA256SUMS"}
    copy = tmp_path / "bundle"
    shutil.copytree(sentiment_bundle, copy)
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text().replace('"passed": true', '"passed": 1'))
    bad = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True, text=True)
    assert bad.returncode == 1 and "manifest.json: FAILED" in bad.stdout


# --- what is written is readable by the group, as the umask says ----------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_shipped_bundle_has_the_umask_modes(sentiment_teacher, sentiment_onnx, tmp_path, umask):
    """Built under the umask (fixtures run before this body, so a fresh bundle): every file and dir as a
    plain open()/mkdir() would make it, so the group can read the bundle, and not the world under 027."""
    old = os.umask(umask)
    try:
        cfg = validate_config(tmp_path, sentiment_teacher, sentiment_onnx, {**SENTIMENT_DATA, "max_eval_samples": 64})
        assert run_cli("validate", "--config", str(cfg)) == 0
    finally:
        os.umask(old)
    shipped = tmp_path / "artifacts" / "test-model" / "1"
    for p in [shipped, *shipped.iterdir()]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, f"{p.name}: {oct(mode)}"
        assert mode & (0o050 if p.is_dir() else 0o040) and not (umask == 0o027 and mode & 0o007), oct(mode)


# --- the model card -------------------------------------------------------------------------------
def test_model_card_stands_alone(sentiment_bundle, sentiment_teacher):
    from huggingface_hub import ModelCard

    from hpcnlp.ship.bundle import sha256

    card = ModelCard.load(sentiment_bundle / "MODEL_CARD.md")
    text = (sentiment_bundle / "MODEL_CARD.md").read_text()
    report = json.loads((sentiment_bundle / "validation.json").read_text())
    data = card.data
    assert data.license == "other"  # the teacher's dir states none, and the config says nothing
    assert data.base_model == os.path.basename(sentiment_teacher) and data.language == "en"
    assert data.pipeline_tag == "text-classification" and "onnx" in data.tags
    for split in ("validation", "test"):
        assert f"{split}.csv sha256:{sha256(SENTIMENT / f'{split}.csv')}" in data.datasets
    got = {(r.dataset_split, r.metric_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert got[("validation", "onnx_int8", "accuracy")] == report["metrics"]["onnx_int8"]["accuracy"]
    assert got[("test", "onnx_fp32", "accuracy")] == report["test_metrics"]["onnx_fp32"]["accuracy"]
    assert report["test_examples"] == 400 and report["cpu"]["model"] and "avx2" in report["cpu"]["flags"]
    assert "held-out test set" in (sentiment_bundle / "validation.md").read_text()

    manifest = json.loads((sentiment_bundle / "manifest.json").read_text())
    assert manifest["source_model"]["sha256"] in text  # the lineage names the model by its hash
    assert manifest["files"]["model.int8.onnx"]["sha256"] in text and "opset 17" in text
    assert "int8 dynamic (preset avx2, per-channel False)" in text
    assert "| input | input_ids | int64 | [batch_size, sequence_length] |" in text
    assert "WordPiece (BertTokenizer), lowercase True" in text and report["cpu"]["model"] in text
    assert "sha256sum -c SHA256SUMS" in text and "hpcnlp verify ." in text
    for machine_path in (str(sentiment_bundle.parents[3]), str(REPO), "/tmp/", os.path.expanduser("~")):
        assert machine_path not in text
