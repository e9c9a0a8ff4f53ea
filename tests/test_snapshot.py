"""Red team, the snapshot is the job (docs/reliability.md#red-team): what submit freezes (the config and every
settings file it names) and the code version a job must start with. Fake Slurm, no training."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from helpers import REPO, SENTIMENT_DATA

from hpcnlp.cli import main
from hpcnlp.runtime import env

ZERO2 = REPO / "jobs" / "deepspeed" / "zero2.json"


def _finetune(tmp_path: Path, **extra) -> Path:
    config = tmp_path / "finetune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "job": "finetune",
                "task": "sequence-classification",
                "output_dir": str(tmp_path / "out"),
                "data": SENTIMENT_DATA,
                **extra,
            }
        )
    )
    return config


def _frozen(fake_slurm) -> dict:
    [call] = fake_slurm.calls("sbatch")
    return yaml.safe_load(Path(call["argv"][-1]).read_text())


def test_code_version_is_the_image_s_the_checkout_s_or_the_package_s(monkeypatch):
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "abc123")
    assert env.code_version() == "abc123"
    monkeypatch.delenv("HPCNLP_GIT_COMMIT")
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    env._checkout_commit.cache_clear()  # cached per process: a commit made since an earlier test must show
    head = git("rev-parse", "HEAD")
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "src") else ""
    assert env.code_version() == head + dirty


def test_submit_freezes_the_files_a_config_names_and_the_job_reads_the_copies(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    deepspeed = tmp_path / "ds.json"
    deepspeed.write_text(ZERO2.read_text())
    downstream = _finetune(tmp_path, training={"deepspeed": str(deepspeed)})
    pretrain = tmp_path / "pretrain.yaml"
    raw = yaml.safe_load((REPO / "jobs" / "pretrain.yaml").read_text())
    raw.update(output_dir=str(tmp_path / "pt"), downstream=str(downstream))
    raw["training"]["deepspeed"] = str(deepspeed)
    pretrain.write_text(yaml.safe_dump(raw))

    from hpcnlp.cluster.submit import snapshot
    from hpcnlp.jobs import load_config

    frozen = yaml.safe_load(snapshot(load_config(pretrain, check=False), str(pretrain), []).read_text())
    original = deepspeed.read_text()
    deepspeed.write_text('{"zero_optimization": {"stage": 3}}')  # edited while the job waits in the queue
    downstream.write_text("job: finetune\n")
    ds_copy, ft_copy = Path(frozen["training"]["deepspeed"]), Path(frozen["downstream"])
    assert ds_copy != deepspeed and ds_copy.read_text() == original
    frozen_downstream = yaml.safe_load(ft_copy.read_text())
    assert frozen_downstream["task"] == "sequence-classification"  # the config as it was at submit
    assert Path(frozen_downstream["training"]["deepspeed"]).read_text() == original
    assert str(tmp_path / "state") in str(ft_copy)


def test_submit_records_the_code_and_a_job_started_from_other_code_refuses(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "aaaa111")
    config = _finetune(tmp_path)
    assert main(["submit", "--config", str(config)]) == 0, capsys.readouterr().err
    [call] = fake_slurm.calls("sbatch")
    assert call["env"]["HPCNLP_SUBMITTED_CODE"] == "aaaa111" and "HPCNLP_ALLOW_CODE_CHANGE" not in call["env"]
    frozen = call["argv"][-1]

    monkeypatch.setenv("HPCNLP_SUBMITTED_CODE", "aaaa111")  # the job's environment, as sbatch passes it
    assert main(["check", "--config", frozen]) == 0
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "bbbb222")  # the image was rebuilt while the job waited
    for command in ("check", "finetune"):
        assert main([command, "--config", frozen]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "code: the job was submitted with code aaaa111 and starts with bbbb222" in errors[0]
    assert not (tmp_path / "out" / "run.json").exists()  # submit made the dir (status.json); the job took nothing
    monkeypatch.setenv("HPCNLP_ALLOW_CODE_CHANGE", "1")
    assert main(["check", "--config", frozen]) == 0


def test_a_release_and_a_commit_are_not_compared(tmp_path, monkeypatch, capsys):
    """A pip-installed login node (a release number) submitting into an image built from a checkout (a
    commit): nothing to compare, so nothing is refused; two releases or two commits are compared."""
    from hpcnlp.jobs import code_problems

    monkeypatch.setenv("HPCNLP_SUBMITTED_CODE", "0.1.0")
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "bbbb222")
    assert code_problems() == []
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "0.2.0")
    assert [p.key for p in code_problems()] == ["code"]
    monkeypatch.setenv("HPCNLP_SUBMITTED_CODE", "aaaa111-dirty")
    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "aaaa111")
    assert [p.key for p in code_problems()] == ["code"]


def test_allow_code_change_travels_with_the_job(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    assert main(["submit", "--allow-code-change", "--config", str(_finetune(tmp_path))]) == 0
    [call] = fake_slurm.calls("sbatch")
    assert call["env"]["HPCNLP_ALLOW_CODE_CHANGE"] == "1"


def test_run_json_and_metrics_json_say_which_code_made_them(tmp_path, monkeypatch):
    from hpcnlp.report import write_report
    from hpcnlp.runtime import rundir

    monkeypatch.setenv("HPCNLP_GIT_COMMIT", "cccc333")
    write_report(tmp_path, "t", {"loss": 1.0}, [])
    assert yaml.safe_load((tmp_path / "metrics.json").read_text())["code_version"] == "cccc333"
    rundir.claim(tmp_path / "run", "hash", overwrite=False, job="finetune")
    [start] = yaml.safe_load((tmp_path / "run" / "run.json").read_text())["starts"]
    assert start["code_version"] == "cccc333"
