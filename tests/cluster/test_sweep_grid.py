"""`hpcnlp sweep --grid ... --seeds ...` against the fake Slurm (tests/fake_slurm/), and `hpcnlp summary`
of the sweep once its tasks have written metrics.json (fabricated here, as finished tasks leave them): one
row per grid point with mean ± std over the seeds, --plot's PNG, --tensorboard's HParams runs."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from helpers import REPO, cli

GRID = ["training.learning_rate=[5e-5,1e-4]", "training.num_train_epochs=[2,3]"]
POINTS = [(lr, ep, seed) for lr in (5e-5, 1e-4) for ep in (2, 3) for seed in (1, 2)]


@pytest.fixture
def workdir(tmp_path, monkeypatch, fake_slurm):
    """A user's working dir: the checkout's jobs/ and data/, its own state and outputs, a CPU profile."""
    for name in ("jobs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"gpus_per_node": 0, "cpus_per_task": 4}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPCNLP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HPCNLP_CLUSTER", str(tmp_path / "cluster.yaml"))
    return tmp_path


def hpcnlp(workdir, *argv):
    return cli(*argv, cwd=workdir, env={"OMP_NUM_THREADS": "1"})


def grid_sweep(workdir, fake_slurm):
    proc = hpcnlp(workdir, "sweep", "--config", "jobs/finetune-sentiment.yaml", "--grid", *GRID, "--seeds", "1", "2")
    assert proc.returncode == 0, proc.stderr
    return workdir / "outputs" / "finetune-sentiment"


def accuracy(lr, epochs, seed):
    return 0.70 + (0.05 if lr == 1e-4 else 0) + 0.01 * epochs + (0.01 if seed == 2 else -0.01)


def finish(sweep_dir, tasks=range(8)):
    """What each finished task leaves: metrics.json (the shape a finetune writes) and its resolved config."""
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    for i in tasks:
        p = manifest["points"][i]
        lr, ep, seed = p["training.learning_rate"], p["training.num_train_epochs"], p["training.seed"]
        task = sweep_dir / f"task-{i}"
        (task / "config.resolved.yaml").write_text(yaml.safe_dump({"training": {"metric_for_best_model": "f1"}}))
        ev = {"accuracy": accuracy(lr, ep, seed), "f1": accuracy(lr, ep, seed) - 0.02, "loss": 0.5, "file": "v"}
        metrics = {"job": "finetune", "task": "sequence-classification", "eval": {"validation": ev}, "global_step": 9}
        (task / "metrics.json").write_text(json.dumps(metrics))


def test_a_2x2_grid_with_2_seeds_is_one_array_of_8_tasks(workdir, fake_slurm):
    sweep_dir = grid_sweep(workdir, fake_slurm)
    [call] = fake_slurm.calls("sbatch")
    assert "--array=0-7" in call["argv"]
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert manifest["grid"] == {
        "training.learning_rate": [5e-5, 1e-4],
        "training.num_train_epochs": [2, 3],
        "training.seed": [1, 2],
    }
    assert manifest["seed_key"] == "training.seed"
    assert [tuple(p.values()) for p in manifest["points"]] == POINTS  # the product, a point's seeds adjacent
    assert manifest["tasks"][5] == [
        "training.learning_rate=1e-4",
        "training.num_train_epochs=2",
        "training.seed=2",
        "output_dir=outputs/finetune-sentiment/task-5",
    ]
    own = json.loads((workdir / call["env"]["HPCNLP_SWEEP"]).read_text())  # what the array's tasks read
    assert own["tasks"] == manifest["tasks"] and own["points"] == manifest["points"]
    status = json.loads((sweep_dir / "task-7" / "status.json").read_text())
    assert status["state"] == "queued" and status["queued_job_id"] == "1001_7"
    # Each task reads as the launcher will run it: the overrides give the grid's values
    from hpcnlp.jobs import load_config

    cfg = load_config("jobs/finetune-sentiment.yaml", manifest["tasks"][5], check=False)
    assert (cfg.training.learning_rate, cfg.training.num_train_epochs, cfg.training.seed) == (1e-4, 2, 2)


def test_the_grid_in_a_dry_run_and_training_seed_in_the_grid(workdir, fake_slurm):
    proc = hpcnlp(
        workdir,
        "sweep",
        "--config",
        "jobs/finetune-sentiment.yaml",
        "--dry-run",
        "--grid",
        "training.seed=[1,2,3]",
        "freeze.layers=[0,3]",
    )
    assert proc.returncode == 0, proc.stderr
    assert "would submit an array of 6 finetune tasks (3 training.seed x 2 freeze.layers)" in proc.stdout
    assert "--array=0-5" in proc.stdout and fake_slurm.calls("sbatch") == []


@pytest.mark.parametrize(
    "options,says",
    [
        (["--grid", *GRID, "--overrides-list", "training.seed=1"], "exactly one of --grid and --overrides-list"),
        ([], "exactly one of --grid and --overrides-list"),
        (["--seeds", "1", "2"], "exactly one of --grid and --overrides-list"),
        (["--grid", "training.learning_rate=1e-4"], "is not key=[v1,v2,...]"),
        (["--grid", "training.seed=[1,2]", "--seeds", "3"], "training.seed is in --grid and --seeds"),
    ],
    ids=["both", "neither", "seeds-only", "not-a-list", "seeds-twice"],
)
def test_grid_options_are_refused_in_one_line(options, says, workdir, fake_slurm):
    proc = hpcnlp(workdir, "sweep", "--config", "jobs/finetune-sentiment.yaml", *options)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr, proc.stderr
    assert fake_slurm.calls() == []


def test_a_bad_grid_value_is_refused_before_anything_is_queued(workdir, fake_slurm):
    proc = hpcnlp(
        workdir, "sweep", "--config", "jobs/finetune-sentiment.yaml", "--grid", "training.num_train_epochs=[2,many]"
    )
    assert proc.returncode == 2
    assert "sweep task 1: training.num_train_epochs=many" in proc.stderr and "nothing was queued" in proc.stderr
    assert fake_slurm.calls("sbatch") == [] and not (workdir / "outputs" / "finetune-sentiment" / "sweep.json").exists()


def test_summary_of_a_seeded_grid_is_one_row_per_point_with_mean_and_std(workdir, fake_slurm):
    sweep_dir = grid_sweep(workdir, fake_slurm)
    finish(sweep_dir)
    proc = hpcnlp(workdir, "summary", str(sweep_dir), "--keys", "eval.validation.accuracy,global_step")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = ["training.learning_rate", "training.num_train_epochs", "n", "eval.validation.accuracy", "global_step"]
    assert lines[0] == "| " + " | ".join(header) + " |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 4
    for (lr, ep, n, acc, step), (want_lr, want_ep) in zip(rows, [(5e-5, 2), (5e-5, 3), (1e-4, 2), (1e-4, 3)]):
        seeds = [accuracy(want_lr, want_ep, s) for s in (1, 2)]
        assert (float(lr), int(ep), n) == (want_lr, want_ep, "2")
        assert acc == f"{statistics.fmean(seeds):.4g} ± {statistics.stdev(seeds):.2g}"
        assert step == "9 ± 0"
    # A task that never finished: its point has n=1, no std
    (sweep_dir / "task-7" / "metrics.json").unlink()
    rows = hpcnlp(workdir, "summary", str(sweep_dir), "--keys", "eval.validation.accuracy").stdout.splitlines()[2:]
    assert rows[-1].endswith(f"| 1 | {accuracy(1e-4, 3, 1):.4g} |")


@pytest.mark.parametrize("flag", ["--plot", "--tensorboard"])
def test_summary_plots_without_the_training_stack_is_one_line(workdir, fake_slurm, monkeypatch, flag):
    """A login node's install (no matplotlib, no torch): the table, and one line saying what --plot needs."""
    from hpcnlp.runtime import stack

    sweep_dir = grid_sweep(workdir, fake_slurm)
    finish(sweep_dir)
    monkeypatch.setattr(stack, "installed", lambda: False)
    proc = hpcnlp(workdir, "summary", flag, str(sweep_dir))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {flag} need(s) the training stack: pip install hpcnlp[train]\n"
    assert not (sweep_dir / "summary.png").exists() and not (sweep_dir / "hparams").exists()


def test_summary_plot_is_a_png_with_one_subplot_per_swept_key(workdir, fake_slurm, monkeypatch):
    from hpcnlp.cluster import summary

    sweep_dir = grid_sweep(workdir, fake_slurm)
    finish(sweep_dir)
    figures = []

    def keep(fig, path):
        figures.append([(ax.get_xlabel(), ax.get_ylabel(), len(ax.containers)) for ax in fig.axes])
        return save(fig, path)

    save = summary.save_figure
    monkeypatch.setattr(summary, "save_figure", keep)
    proc = hpcnlp(workdir, "summary", "--plot", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    png = sweep_dir / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert f"summary: wrote {png}" in proc.stderr
    # The job's primary metric (the run's metric_for_best_model: f1), one line per value of the other key
    assert figures == [
        [
            ("training.learning_rate", "eval.validation.f1", 2),
            ("training.num_train_epochs", "eval.validation.f1", 2),
        ]
    ]
    assert not list(sweep_dir.glob(".*summary.png*")), "written aside, then renamed"
    figures.clear()
    assert hpcnlp(workdir, "summary", "--plot", "--keys", "global_step", str(sweep_dir)).returncode == 0
    assert [y for _, y, _ in figures[0]] == ["global_step", "global_step"]


def test_summary_plot_needs_one_sweep(workdir, tmp_path):
    run = tmp_path / "single"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"eval": {"validation": {"f1": 0.5}}}))
    proc = hpcnlp(workdir, "summary", "--plot", str(run))
    assert proc.returncode == 2 and "--plot take the runs of one sweep" in proc.stderr
    assert not (run / "summary.png").exists()


def test_summary_tensorboard_writes_each_task_as_an_hparams_run(workdir, fake_slurm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep_dir = grid_sweep(workdir, fake_slurm)
    finish(sweep_dir)
    for _ in range(2):  # a second summary replaces the runs, never piles up event files
        proc = hpcnlp(workdir, "summary", "--tensorboard", "--keys", "eval.validation.accuracy", str(sweep_dir))
        assert proc.returncode == 0, proc.stderr
    assert f"tensorboard --logdir {sweep_dir / 'hparams'}" in proc.stderr
    runs = sorted(p.name for p in (sweep_dir / "hparams").iterdir())
    assert runs == [f"task-{i}" for i in range(8)]
    events = list((sweep_dir / "hparams" / "task-5").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(sweep_dir / "hparams" / "task-5"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["training.learning_rate"].number_value == 1e-4
    assert hparams["training.num_train_epochs"].number_value == 2
    assert hparams["training.seed"].number_value == 2
    [scalar] = acc.Scalars("eval.validation.accuracy")
    assert scalar.value == pytest.approx(accuracy(1e-4, 2, 2))
