"""`python -m bench --only large`: prepare and pretrain on a real large corpus, the Linux kernel source.

Corpus: Debian's linux-source-6.1 (`apt-get download`, ~139 MB .deb), unpacked once into
data/full/linux/ (git-ignored); its .c, .h and .rst files, ~1.3 GB. The "100mb" cases take the
first ~100 MB of those files in path order. Prepared results stay in data/full/linux/prepared-<size>/.

prepare: N tasks = N `hpcnlp prepare` processes with a Slurm array task's environment
(SLURM_ARRAY_TASK_ID/COUNT), the code path of `sbatch --array`, on this one machine; tokens/s over
the wall time until the index is written, and each task's own peak RSS (wait4).
pretrain: the pretrain job's data path (prepared Blocks, memory-mapped, in prepared order) with
MiniLM-L6, the same steps on the large prepared corpus and on the shipped one: step time (CPU
seconds), peak RSS, and start-up (seconds from the start of the case to the end of the first step).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "data" / "full" / "linux"
PATTERNS = ["**/*.c", "**/*.h", "**/*.rst"]


def kernel_source() -> Path:
    """The unpacked kernel tree (downloaded and unpacked on first use)."""
    tree = CACHE / "linux-source-6.1"
    if (tree / "MAINTAINERS").is_file():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(CACHE / "linux-source-6.1_*.deb")):
        subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=CACHE, check=True)
    deb = sorted(glob.glob(str(CACHE / "linux-source-6.1_*.deb")))[-1]
    subprocess.run(["dpkg-deb", "-x", deb, str(CACHE / "deb")], check=True)
    subprocess.run(["tar", "-xJf", str(CACHE / "deb/usr/src/linux-source-6.1.tar.xz"), "-C", str(CACHE)], check=True)
    return tree


def corpus_files(size: str) -> list[str]:
    from hpcnlp.data.corpus import expand_files

    files = expand_files([str(kernel_source() / p) for p in PATTERNS])
    if size == "full":
        return files
    budget, out = 100 * 2**20, []
    for f in files:
        out.append(f)
        budget -= os.path.getsize(f)
        if budget <= 0:
            break
    return out


def _config(work: Path, size: str, prepared_root: Path) -> Path:
    """A prepare config; its file list is written out (a 100 MB subset is thousands of paths)."""
    import yaml

    files = corpus_files(size)
    path = work / f"prepare-{size}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "job": "prepare",
                "model_name_or_path": "minilm-l6",
                "data": {
                    # 8 MB shards: ~13 at 100 MB, so tasks share the work evenly (at the 64 MB default, 100 MB is
                    # 2 shards and 2 tasks could at best be 1.56x one; a 100 GB corpus is 1,600 shards of 64 MB).
                    "train_files": files,
                    "sample_by": "paragraph",
                    "max_seq_length": 128,
                    "eval_fraction": 0.01,
                    "shard_mb": 8,
                    "prepared_root": str(prepared_root),
                },
            }
        )
    )
    return path


def prepare(work: str, size: str, tasks: int) -> dict:
    """N prepare tasks at once; tokens/s over the wall time, each task's peak RSS and CPU seconds.
    The result stays in data/full/linux/prepared-<size>/ for the pretrain cases."""
    import shutil

    work_dir = Path(work)
    root = CACHE / f"prepared-{size}"
    config = _config(work_dir, size, root)
    input_bytes = sum(os.path.getsize(f) for f in corpus_files(size))
    shutil.rmtree(root, ignore_errors=True)  # measure a build, never a reuse
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hpcnlp", "prepare", "--config", str(config)],
            env={
                **os.environ,
                "SLURM_ARRAY_TASK_ID": str(i),
                "SLURM_ARRAY_TASK_COUNT": str(tasks),
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(tasks)
    ]
    rss, cpu, logs = [], [], []
    for p in procs:
        logs.append(p.stdout.read()[-2000:])  # before waiting: a full pipe would block the task
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        rss.append(round(usage.ru_maxrss / 1024, 1))  # this task's own peak (it forks no workers)
        cpu.append(usage.ru_utime + usage.ru_stime)  # its own CPU seconds: neighbours on the machine do not count
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a prepare task failed: {logs}")
    stats = json.loads(next(root.glob("*/stats.json")).read_text())
    return {
        "size": size,
        "tasks": tasks,
        "input_mb": round(input_bytes / 2**20, 1),
        "files": len(corpus_files(size)),
        "tokens": stats["tokens"],
        "blocks": stats["blocks"],
        "shards": stats["shards"],
        "documents": stats["documents_train"] + stats["documents_eval"],
        "wall_seconds_prepare": round(wall, 1),
        "tokens_per_second": round(stats["tokens"] / wall, 1),
        "task_peak_rss_mb": rss,
        "peak_rss_mb": max(rss),
        "tokens_per_second_per_task": stats["tokens_per_second_per_task"],
        "task_cpu_seconds": [round(c, 1) for c in cpu],
        "tokens_per_cpu_second": round(stats["tokens"] / sum(cpu), 1),
    }


def pretrain(work: str, corpus: str, steps: int, batch: int, warmup: int) -> dict:
    """Train MiniLM-L6 on prepared blocks (the pretrain job's data path) for a few steps."""
    t0 = time.perf_counter()
    from bench.pretrain import SEED, _run, corpus_config, eval_set
    from bench.timing import StepClock
    from hpcnlp.config import CorpusConfig
    from hpcnlp.data.pack import find
    from hpcnlp.data.pack import prepare as prepare_corpus
    from hpcnlp.jobs.pretrain import PretrainConfig
    from hpcnlp.models import load_tokenizer
    from hpcnlp.train.mlm import MLMCollator, build_masked_lm, enable_sparse_mlm_head

    tokenizer = load_tokenizer("minilm-l6")
    if corpus != "shipped":  # full or 100mb: the kernel source, as the prepare case left it
        import yaml

        data_cfg = CorpusConfig(
            **yaml.safe_load(_config(Path(work), corpus, CACHE / f"prepared-{corpus}").read_text())["data"]
        )
        prepared = find(data_cfg, tokenizer)
        if prepared is None:
            raise RuntimeError(f"run a large_prepare_{corpus}_* case first: it leaves the prepared corpus")
    else:
        data_cfg = corpus_config(128, work)
        prepared = prepare_corpus(data_cfg, tokenizer)
    t0 = loaded_at = time.perf_counter()  # start-up: from here (the prepared data exists) to the first step's end
    data = prepared.load()
    load_seconds = time.perf_counter() - loaded_at
    cfg = PretrainConfig(output_dir=str(Path(work) / "out"), data=data_cfg)
    model = build_masked_lm(cfg, tokenizer)
    used = enable_sparse_mlm_head(model)
    collator = MLMCollator(tokenizer, cfg.mlm_probability, False, SEED)
    first_step = []
    real_end = StepClock.on_step_end

    def note_first(self, *a, **k):
        if not first_step:
            first_step.append(time.perf_counter() - t0)
        return real_end(self, *a, **k)

    StepClock.on_step_end = note_first
    r = _run(
        model,
        data["train"],
        collator,
        tokenizer,
        work,
        steps,
        batch,
        warmup,
        eval_set(tokenizer, work),
        used,
        128,
        remove_unused_columns=False,
    )
    # Peak RSS counts the memory-mapped shards' pages that were touched (clean page cache, shared by the
    # node's processes, dropped under pressure); the process's own memory is the anonymous part.
    status = Path("/proc/self/status").read_text()
    own = {k: round(int(status.split(f"{k}:")[1].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")}
    return {
        **r,
        "corpus": corpus,
        "train_blocks": len(data["train"]),
        "load_seconds": round(load_seconds, 3),
        "rss_anon_mb_at_end": own["RssAnon"],
        "rss_file_mb_at_end": own["RssFile"],
        "startup_seconds_to_first_step": round(first_step[0], 2),
        "prepared_tokens": prepared.stats["tokens"],
    }


def cases(work: str) -> dict[str, dict]:
    out = {
        f"large_prepare_100mb_t{n}": {"run": "bench.large.prepare", "work": work, "size": "100mb", "tasks": n}
        for n in (1, 2, 4)
    }
    out["large_prepare_full_t2"] = {"run": "bench.large.prepare", "work": work, "size": "full", "tasks": 2}
    for corpus in ("full", "100mb", "shipped"):
        out[f"large_pretrain_{corpus}"] = {
            "run": "bench.large.pretrain",
            "work": work,
            "corpus": corpus,
            "steps": 12,
            "batch": 8,
            "warmup": 2,
        }
    return out


def ratios(res: dict) -> dict:
    def ok(name, key):
        r = res.get(name)
        return r.get(key) if r and "error" not in r else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return {
        "prepare_scaling_2_tasks": ratio(
            ok("large_prepare_100mb_t2", "tokens_per_second"), ok("large_prepare_100mb_t1", "tokens_per_second")
        ),
        "large_rss_growth": ratio(
            ok("large_prepare_full_t2", "peak_rss_mb"), ok("large_prepare_100mb_t2", "peak_rss_mb")
        ),
        "large_step_time_ratio": ratio(
            ok("large_pretrain_full", "step_seconds_median"), ok("large_pretrain_shipped", "step_seconds_median")
        ),
        # The same at ~100 MB (measured where the 1.3 GB runs did not fit in the time).
        "large_step_time_ratio_100mb": ratio(
            ok("large_pretrain_100mb", "step_seconds_median"), ok("large_pretrain_shipped", "step_seconds_median")
        ),
    }


def table(res: dict) -> list[dict]:
    rows = []
    for name, r in res.items():
        if not name.startswith("large_") or "error" in r:
            continue
        if "tasks" in r:
            rows.append(
                {
                    "case": name,
                    "input MB": r["input_mb"],
                    "tasks": r["tasks"],
                    "tokens": f"{r['tokens']:,}",
                    "tokens/s (wall)": r["tokens_per_second"],
                    "per-task peak RSS MB": r["task_peak_rss_mb"],
                }
            )
        else:
            rows.append(
                {
                    "case": name,
                    "input MB": "",
                    "tasks": "",
                    "tokens": f"{r['prepared_tokens']:,}",
                    "tokens/s (wall)": r.get("wall_tokens_per_second"),
                    "per-task peak RSS MB": r["peak_rss_mb"],
                    "anon / file RSS MB at end": f"{r.get('rss_anon_mb_at_end')} / {r.get('rss_file_mb_at_end')}",
                    "step s (CPU)": r["step_seconds_median"],
                    "start-up s": r["startup_seconds_to_first_step"],
                }
            )
    return rows


def chart(res: dict, out: Path) -> str | None:
    """large.png: prepare tokens/s (wall) and per-task peak RSS against task count, one line per corpus size."""
    import matplotlib.pyplot as plt

    from hpcnlp.report import save_figure

    runs = [r for k, r in res.items() if k.startswith("large_prepare_") and "error" not in r]
    if not runs:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for size in sorted({r["input_mb"] for r in runs}):
        pts = sorted((r["tasks"], r["tokens_per_second"], r["peak_rss_mb"]) for r in runs if r["input_mb"] == size)
        tasks, tps, rss = zip(*pts)
        a.plot(tasks, tps, "o-", label=f"{size:,.0f} MB")
        b.plot(tasks, rss, "o-", label=f"{size:,.0f} MB")
    a.set(
        xlabel="prepare tasks (2 cores)",
        ylabel="tokens/s (wall clock)",
        title="prepare: throughput",
        ylim=(0, max(r["tokens_per_second"] for r in runs) * 1.2),
    )
    b.set(
        xlabel="prepare tasks (2 cores)",
        ylabel="largest per-task peak RSS MB",
        title="prepare: memory per task",
        ylim=(0, max(r["peak_rss_mb"] for r in runs) * 1.3),
    )
    for ax in (a, b):
        ax.set_xticks(sorted({r["tasks"] for r in runs}))
        ax.grid(alpha=0.3)
        ax.legend(title="corpus")
    save_figure(fig, out / "large.png")
    return "large.png"
