"""Red team, shipping edges (docs/reliability.md#red-team): `verify` on hostile manifests, the loser of two
validates of one version, ONNX models with external data. Fast: tiny ONNX graphs made here, no training."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import cli

from hpcnlp.jobs import EXIT_CONFIG, registry, run_job
from hpcnlp.jobs.validate import ValidateConfig
from hpcnlp.jobs.validate import publish as validate_publish
from hpcnlp.runtime import status
from hpcnlp.ship import bundle


def _bundle_with(tmp_path, manifest: bytes):
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "manifest.json").write_bytes(manifest)
    (path / "model.onnx").write_bytes(b"not onnx")
    return path


@pytest.mark.parametrize(
    "manifest,fragment",
    [
        (b'{"files": {"model.onnx": {"sha256": "ab"}}, "passed": true}', "is not {bytes: <int>, sha256: <hex>}"),
        (
            b'{"files": {"model.onnx": {"bytes": 8, "sha256": "\xff"}}, "passed": true}',
            "unreadable (UnicodeDecodeError",
        ),
        (b'{"files": {"\\ud800x": {"bytes": 1, "sha256": "ab"}}, "passed": true}', "is not a file name"),
        (json.dumps({"files": {"a" * 300: {"bytes": 1, "sha256": "ab"}}, "passed": True}).encode(), "255 bytes"),
    ],
    ids=["no-bytes", "not-utf8", "lone-surrogate", "name-too-long"],
)
def test_verify_refuses_a_hostile_manifest_in_one_line(tmp_path, manifest, fragment):
    res = cli("verify", str(_bundle_with(tmp_path, manifest)))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines and all(line.startswith("error: ") for line in lines), res.stderr
    assert any(fragment in line for line in lines), lines


def _validate_cfg(tmp_path) -> ValidateConfig:
    cfg = ValidateConfig(
        name="m",
        version="1",
        model_name_or_path=str(tmp_path / "model"),
        onnx_dir=str(tmp_path / "onnx"),
        data={"train_file": str(tmp_path / "t.csv")},
        output_dir=str(tmp_path / "artifacts"),
        rejected_dir=str(tmp_path / "rejected"),
    )
    return cfg


def _staged(cfg, who: str):
    staging = cfg.bundle_dir.parent / f".staging-{who}"
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text(json.dumps({"who": who}))
    return staging


def test_the_loser_of_two_validates_says_so_and_leaves_the_winners_bundle_and_status(tmp_path, monkeypatch, capsys):
    cfg = _validate_cfg(tmp_path)
    status_file = registry()["validate"].status_file(cfg)

    def lose(cfg):  # while this run measured, the other one shipped the same version and finished
        staging = _staged(cfg, "loser")
        bundle.publish(_staged(cfg, "winner"), cfg.bundle_dir)
        status.update(status_file, state="finished", reason=None, winner=True)
        return validate_publish(staging, cfg)

    monkeypatch.setitem(registry(), "validate", dataclasses.replace(registry()["validate"], run=lose))
    assert run_job(cfg) == EXIT_CONFIG
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was shipped by another run while this one ran" in errors[0], errors
    assert json.loads((cfg.bundle_dir / "manifest.json").read_text()) == {"who": "winner"}
    written = json.loads(status_file.read_text())
    assert written["state"] == "finished" and written["winner"] is True, written


def test_two_publishes_of_one_version_one_wins_the_other_is_refused(tmp_path, monkeypatch):
    cfg = _validate_cfg(tmp_path)
    first, second = _staged(cfg, "a"), _staged(cfg, "b")
    real_exists = type(cfg.bundle_dir).exists
    # both checked for the bundle before either renamed it into place: the race a check cannot close
    monkeypatch.setattr(type(cfg.bundle_dir), "exists", lambda p: False if p == cfg.bundle_dir else real_exists(p))
    bundle.publish(first, cfg.bundle_dir)
    with pytest.raises(FileExistsError):
        bundle.publish(second, cfg.bundle_dir)
    assert json.loads((cfg.bundle_dir / "manifest.json").read_text()) == {"who": "a"}
    assert second.is_dir()  # the loser's staging is its own to clean up


def _external_data_model(onnx_dir):
    """A tiny ONNX model keeping its weights in model.onnx_data, as a model over 2 GB must."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, str(onnx_dir / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    for name in ("config.json", "tokenizer.json"):
        (onnx_dir / name).write_text("{}")
    return onnx_dir


def test_external_data_travels_through_staging_the_manifest_verify_and_the_card(tmp_path):
    from hpcnlp.ship.card import model_files_text
    from hpcnlp.ship.onnx import external_data_files

    onnx_dir = _external_data_model(tmp_path / "onnx")
    assert external_data_files(onnx_dir / "model.onnx") == ["model.onnx_data"]
    staging = bundle.stage(onnx_dir, tmp_path / "artifacts")
    assert (staging / "model.onnx_data").read_bytes() == (onnx_dir / "model.onnx_data").read_bytes()
    for name in ("MODEL_CARD.md", "validation.json"):
        (staging / name).write_text("{}")
    manifest = bundle.write_manifest(staging, {"passed": True})
    assert manifest["files"]["model.onnx_data"]["bytes"] == 48  # 12 float32 weights
    shipped = bundle.publish(staging, tmp_path / "artifacts" / "m" / "1")
    assert bundle.verify(shipped) == []  # onnxruntime loads the model with its weights
    card = model_files_text(shipped, ["model.onnx"])
    assert f"with external data `model.onnx_data` (sha256 `{bundle.sha256(shipped / 'model.onnx_data')}`)" in card
    (shipped / "model.onnx_data").unlink()
    assert any("model.onnx_data: listed in the manifest but missing" in p for p in bundle.verify(shipped))


def test_validate_check_refuses_external_data_that_is_not_beside_the_model(tmp_path):
    from hpcnlp.jobs.validate import external_data_problems

    onnx_dir = _external_data_model(tmp_path / "onnx")
    assert external_data_problems(onnx_dir) == []
    (onnx_dir / "model.onnx_data").unlink()
    [problem] = external_data_problems(onnx_dir)
    assert problem.key == "onnx_dir" and "external data 'model.onnx_data' is not a file beside it" in problem.message
