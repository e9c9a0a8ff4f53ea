"""The model card's lineage: read from the files hpcnlp's jobs leave, named by content hashes."""

from __future__ import annotations

import json
import shutil

import yaml
from helpers import SENTIMENT


def test_lineage_follows_hpcnlp_outputs_to_the_base_model(tmp_path, minilm_path):
    """A distilled student of a fine-tuned MiniLM: three stages, base model first, with its license from
    its own card, each model and data file by hash, no path."""
    from hpcnlp.ship import card
    from hpcnlp.ship.bundle import dir_sha256, sha256

    def job_output(name: str, job: dict) -> str:
        out = tmp_path / name
        out.mkdir()
        shutil.copy(f"{minilm_path}/config.json", out / "config.json")
        (out / "config.resolved.yaml").write_text(yaml.safe_dump(job))
        (out / "metrics.json").write_text("{}")
        return str(out)

    data = {"train_file": str(SENTIMENT / "train.csv"), "validation_file": str(SENTIMENT / "validation.csv")}
    teacher = job_output("finetune-sentiment", {"job": "finetune", "model_name_or_path": "minilm-l6", "data": data})
    student = job_output("distill-sentiment", {"job": "distill", "teacher": teacher, "data": data})

    chain = card.lineage(student)
    assert [(s["stage"], s["model"]) for s in chain] == [
        ("base", "minilm-l6"),
        ("finetune", "finetune-sentiment"),
        ("distill", "distill-sentiment"),
    ]
    assert chain[0]["license"] == "apache-2.0" and chain[0]["sha256"] == dir_sha256(minilm_path)
    assert chain[2]["sha256"] == dir_sha256(student)
    assert chain[1]["data"] == [
        {"file": "train.csv", "sha256": sha256(SENTIMENT / "train.csv")},
        {"file": "validation.csv", "sha256": sha256(SENTIMENT / "validation.csv")},
    ]
    assert str(tmp_path) not in str(chain)
    # A student of an ensemble (a list of teachers): the chain follows the first teacher.
    ensemble = job_output("self-distill", {"job": "distill", "teacher": [teacher, "minilm-l6"], "data": data})
    assert [s["model"] for s in card.lineage(ensemble)] == ["minilm-l6", "finetune-sentiment", "self-distill"]


def test_lineage_of_a_foreign_model_is_that_model(tmp_path, minilm_path):
    from hpcnlp.ship import card

    shutil.copytree(minilm_path, tmp_path / "m")
    (tmp_path / "m" / "README.md").unlink()
    assert [(s["stage"], s["model"], s["license"]) for s in card.lineage(str(tmp_path / "m"))] == [("base", "m", None)]


def test_lineage_names_a_pretraining_corpus_by_its_prepared_fingerprint(tmp_path, minilm_path):
    from hpcnlp.ship import card

    out = tmp_path / "pretrain-pydocs"
    out.mkdir()
    shutil.copy(f"{minilm_path}/config.json", out / "config.json")
    (out / "config.resolved.yaml").write_text(
        yaml.safe_dump(
            {"job": "pretrain", "model_name_or_path": "minilm-l6", "data": {"train_files": ["/corpus/**/*.rst.txt"]}}
        )
    )
    (out / "metrics.json").write_text(json.dumps({"prepared": {"fingerprint": "98b22f2a4f7926a5"}}))
    chain = card.lineage(str(out))
    assert [(s["stage"], s.get("corpus_fingerprint")) for s in chain] == [
        ("base", None),
        ("pretrain", "98b22f2a4f7926a5"),
    ]
