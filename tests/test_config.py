"""Config validation: every class of bad config gets one line naming file, key and fix; exit 2; nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import prepare_corpus, run_cli

from hpcnlp.cli import main
from hpcnlp.config import ConfigError, with_overrides
from hpcnlp.jobs import EXIT_CONFIG, load_config
from hpcnlp.jobs.pretrain import PretrainConfig


def _check(tmp_path, cfg: dict, *overrides: str):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, main(["check", "--config", str(path), *overrides])


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_shipped_pretrain_config_is_valid():
    cfg = load_config("jobs/pretrain.yaml")
    assert isinstance(cfg, PretrainConfig)
    assert cfg.data.max_seq_length == 128 and cfg.trust_remote_code is False


def test_valid_config_passes_check(tmp_path, pretrain_config, capsys):
    path, _ = pretrain_config
    # The shipped cluster profile sends pretrain to 2 nodes, a process group that does not tokenize: check
    # warns that its data is not prepared yet (submit refuses it; tests/test_cluster_profile.py), and passes.
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid 'pretrain' config" in out
    assert "WARNING hpcnlp.check: data: no prepared data at" in out and "2-process run does not tokenize" in out
    prepare_corpus(path)
    assert main(["check", "--config", str(path)]) == 0
    assert "no prepared data" not in capsys.readouterr().out


def test_unknown_key_suggests_the_right_one(tmp_path, pretrain_config, capsys):
    _, cfg = pretrain_config
    cfg["training"]["learning_rat"] = 1e-4
    cfg["mlm_probabilty"] = 0.2
    path, code = _check(tmp_path, cfg)
    assert code == EXIT_CONFIG
    errs = _errors(capsys)
    assert any(str(path) in e and "training.learning_rat" in e and "did you mean 'learning_rate'" in e for e in errs)
    assert any("mlm_probabilty" in e and "did you mean 'mlm_probability'" in e for e in errs)


def test_wrong_type_and_range(tmp_path, pretrain_config, capsys):
    _, cfg = pretrain_config
    cfg["training"]["per_device_train_batch_size"] = "lots"
    cfg["mlm_probability"] = 1.5
    _, code = _check(tmp_path, cfg)
    errs = _errors(capsys)
    assert code == EXIT_CONFIG and len(errs) == 2
    assert any("training.per_device_train_batch_size" in e and "'lots'" in e for e in errs)
    assert any("mlm_probability" in e and "less than 1" in e for e in errs)


def test_missing_model_dir_and_corpus(tmp_path, pretrain_config, capsys):
    _, cfg = pretrain_config
    cfg["model_name_or_path"] = str(tmp_path / "no-such-model")
    cfg["data"]["train_files"] = [str(tmp_path / "nothing-here/*.txt")]
    _, code = _check(tmp_path, cfg)
    errs = _errors(capsys)
    assert code == EXIT_CONFIG
    assert any("model_name_or_path" in e and "hub ids are not fetched" in e for e in errs)
    assert any("data.train_files" in e and "matches no file" in e for e in errs)


def test_hub_id_is_refused(tmp_path, pretrain_config, capsys):
    _, cfg = pretrain_config
    cfg["model_name_or_path"] = "bert-base-uncased"
    _, code = _check(tmp_path, cfg)
    assert code == EXIT_CONFIG and any("local model dir" in e for e in _errors(capsys))


def test_another_configs_finished_run_needs_overwrite(tmp_path, pretrain_config, capsys):
    path, cfg = pretrain_config
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"done": True}))
    assert main(["check", "--config", str(path), "overwrite=true"]) == EXIT_CONFIG  # no run recorded it
    assert any("did not write: metrics.json" in e for e in _errors(capsys))
    (out / "run.json").write_text(json.dumps({"run": "another-config", "files": ["metrics.json"]}))
    for flags in ([], ["resume=auto"]):
        assert main(["check", "--config", str(path), *flags]) == EXIT_CONFIG
        assert any("output_dir" in e and "another config" in e and "overwrite: true" in e for e in _errors(capsys))
    assert main(["check", "--config", str(path), "overwrite=true"]) == 0


def test_incompatible_options(tmp_path, pretrain_config, capsys):
    _, cfg = pretrain_config
    cfg["training"].update(bf16=True, fp16=True, deepspeed=str(tmp_path / "missing.json"))
    cfg["data"]["eval_fraction"] = 0
    _, code = _check(tmp_path, cfg)
    errs = _errors(capsys)
    assert code == EXIT_CONFIG
    assert any("training.bf16" in e for e in errs)
    assert any("training.deepspeed" in e for e in errs)
    assert any("data.eval_fraction" in e for e in errs)


def test_wrong_job_and_bad_yaml(tmp_path, pretrain_config, capsys):
    path, cfg = pretrain_config
    assert main(["prepare", "--config", str(path)]) == EXIT_CONFIG
    assert any("not 'prepare'" in e for e in _errors(capsys))
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: pretrain\ntraining: [unclosed\n")
    assert main(["check", "--config", str(bad)]) == EXIT_CONFIG
    assert any("not valid YAML" in e for e in _errors(capsys))
    cfg["job"] = "pretrian"
    _, code = _check(tmp_path, cfg)
    assert code == EXIT_CONFIG and any("did you mean 'pretrain'" in e for e in _errors(capsys))


def test_refused_job_writes_nothing(tmp_path, pretrain_config):
    path, _ = pretrain_config
    assert main(["pretrain", "--config", str(path), "training.max_stepz=3"]) == EXIT_CONFIG
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_overrides_are_dotted_and_typed():
    base = {"training": {"max_steps": 1, "seed": 3}, "data": {"train_files": ["x"]}}
    assert with_overrides(base, ["training.max_steps=10", "data.train_files=[a,b]", "overwrite=true"]) == {
        "training": {"max_steps": 10, "seed": 3},
        "data": {"train_files": ["a", "b"]},
        "overwrite": True,
    }
    with pytest.raises(ConfigError, match="key=value"):
        with_overrides(base, ["training.max_steps"])


def test_trust_remote_code_is_off_by_default(pretrain_config):
    path, _ = pretrain_config
    assert load_config(path).trust_remote_code is False


def test_training_is_training_arguments(tmp_path, pretrain_config, capsys):
    """Any TrainingArguments field is a `training:` key, typed as TrainingArguments types it."""
    from hpcnlp.train.harness import training_arguments

    path, cfg = pretrain_config
    # what the job owns when the config says nothing: one curve per output_dir, no unused-parameter search
    plain = training_arguments(load_config(path).training, str(tmp_path / "out"))
    assert plain.logging_dir == str(tmp_path / "out" / "runs") and plain.run_name == "out"
    assert plain.ddp_find_unused_parameters is False and plain.report_to == []
    everyday = {
        "report_to": ["tensorboard"],
        "run_name": "mine",
        "adam_beta2": 0.98,
        "label_smoothing_factor": 0.1,
        "ddp_timeout": 600,
        "ddp_find_unused_parameters": True,
        "save_only_model": True,
        "dataloader_num_workers": 2,
        "lr_scheduler_type": "cosine",
    }
    cfg["training"].update(everyday)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", "--config", str(path)]) == 0
    args = training_arguments(load_config(path).training, str(tmp_path / "out"))
    assert {k: getattr(args, k) for k in everyday} == everyday


@pytest.mark.parametrize(
    "override,expected",
    [
        ("training.adam_beta3=0.9", "training.adam_beta3: unknown key. Fix: did you mean 'adam_beta2'?"),
        ("training.adam_beta2=high", "training.adam_beta2: Input should be a valid number"),
        (
            "training.output_dir=x",
            "training.output_dir: is set by the job, not in training:. Fix: set the top-level output_dir",
        ),
        ("training.lr_scheduler_type=cosin", "training: TrainingArguments refuses these settings"),
        ("training.learning_rate=.inf", "training.learning_rate: Input should be a finite number"),
        ("output_dir=[x", "output_dir=[x: cannot be read"),
        ("data.train_files={a: 1}", "data.train_files={a: 1}: cannot be read (Cannot merge incompatible container"),
        ("resume=/etc", "resume: '/etc' is not a complete checkpoint of this run: incomplete"),
    ],
)
def test_bad_values_are_one_line_each(pretrain_config, capsys, override, expected):
    path, _ = pretrain_config
    assert main(["check", "--config", str(path), override]) == EXIT_CONFIG
    errs = _errors(capsys)
    assert any(expected in e for e in errs), errs
    assert "Traceback" not in capsys.readouterr().err


def test_yaml_duplicate_keys_aliases_and_loops_are_refused_in_one_line(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys silently; an alias bomb expands to gigabytes once OmegaConf
    copies it (with any override); an alias inside itself loops. Each is one line, exit 2, at once."""
    import time

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    cases = {
        "job: pretrain\nmax_requeues: 3\nmax_requeues: 0\n": "key 'max_requeues' is given twice (first on line 2)",
        "job: pretrain\n" + laughs: "with its aliases (at most 100,000)",
        "job: pretrain\nloop: &l [1, *l]\n": "an alias refers to itself",
    }
    for text, expected in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        t0 = time.monotonic()
        assert run_cli("check", "--config", str(path), "training.max_steps=5") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and str(path) in err[0], err
        assert time.monotonic() - t0 < 10  # refused, not expanded
    merged = tmp_path / "merge.yaml"  # merge keys (<<) are not duplicates
    merged.write_text("base: &b {x: 1}\nother: {<<: *b, y: 2}\n")
    from hpcnlp.config import read_yaml

    assert read_yaml(merged)["other"] == {"x": 1, "y": 2}


def test_metric_for_best_model_is_a_metric_the_task_logs(capsys):
    """A typo (`acc`) passed check and crashed at the first evaluation, after an epoch of training."""
    sentiment, ner = "jobs/finetune-sentiment.yaml", "jobs/finetune-ner.yaml"
    assert run_cli("check", "--config", sentiment, "training.metric_for_best_model=acc") == 2
    err = capsys.readouterr().err
    assert "training.metric_for_best_model: 'acc' is not a metric sequence-classification evaluations log" in err
    assert "'accuracy', 'precision', 'recall', 'f1', 'loss'" in err
    assert run_cli("check", "--config", ner, "training.metric_for_best_model=accuracy") == 2  # NER: token_accuracy
    for name in ("eval_f1", "loss", "token_accuracy"):
        assert run_cli("check", "--config", ner, f"training.metric_for_best_model={name}") == 0
