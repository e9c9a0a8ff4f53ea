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
