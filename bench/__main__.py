"""`python -m bench` (make bench): every case in its own process, then summary.json/.md and charts.

--quick: a smoke run with tiny step counts (rates meaningless); --levers: also measure the levers
tried on the hpcnlp path (fused AdamW, torch.compile, a dataloader worker, sparse head off).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

# One thread per process, set before torch loads: rates are per CPU second (bench/timing.py), which
# counts a single thread's own work; more threads would add their spin-waits.
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.large import ratios as large_ratios  # noqa: E402
from bench.timing import run_isolated  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "outputs" / "bench"


def plan(quick: bool, levers: bool, gpu: bool, large: bool = False, adapters: bool = False) -> dict[str, dict]:
    """name -> case. Steps: enough steady steps for a rate on 2 busy cores; the seed recipe is ~40x
    slower per real token, so it gets fewer (a rate needs few)."""
    s, s_seed, w = (3, 2, 1) if quick else (6, 3, 2)
    # Fine-tuning: hpcnlp's batches differ in length (length-grouped, random order; the longest comes
    # first), so it needs many steps for a fair mean; padded recipes cost the same every step.
    f_dyn, f, f_seed = (3, 3, 2) if quick else (40, 10, 3)
    work = str(WORK)
    pre = "bench.pretrain."
    cases = {}
    for times, num_proc in ((1, 1), (4, 1), (4, 2), (16, 1)):
        if quick and times > 4:
            continue
        cases[f"prepare_x{times}_np{num_proc}"] = {"run": "bench.prepare.run", "work": work, "times": times,
                                                   "num_proc": num_proc}
    b = 8  # 8 x 128 = 1024 tokens per step at every block size: 8 x 128, 4 x 256, 2 x 512
    cases.update({
        "pretrain_hpcnlp_128": {"run": pre + "hpcnlp", "work": work, "block": 128, "steps": s, "batch": b, "warmup": w},
        "pretrain_run_mlm_128": {"run": pre + "run_mlm", "work": work, "block": 128, "steps": s, "batch": b, "warmup": w},
        "pretrain_hpcnlp_256": {"run": pre + "hpcnlp", "work": work, "block": 256, "steps": s, "batch": b // 2, "warmup": w},
        "pretrain_hpcnlp_512": {"run": pre + "hpcnlp", "work": work, "block": 512, "steps": s, "batch": b // 4, "warmup": w},
        "pretrain_run_mlm_512": {"run": pre + "run_mlm", "work": work, "block": 512, "steps": s, "batch": b // 4, "warmup": w},
        "pretrain_seed_recipe": {"run": pre + "seed_recipe", "work": work, "steps": s_seed, "batch": b // 4, "warmup": 1},
        "finetune_hpcnlp": {"run": "bench.finetune.hpcnlp", "work": work, "steps": f_dyn, "batch": 16, "warmup": w},
        "finetune_run_glue": {"run": "bench.finetune.padded", "work": work, "steps": f, "batch": 16, "warmup": w,
                              "max_length": 128},
        "finetune_seed_recipe": {"run": "bench.finetune.padded", "work": work, "steps": f_seed, "batch": 16,
                                 "warmup": 1, "max_length": 512},
    })
    if levers:
        base = cases["pretrain_hpcnlp_128"]
        cases["lever_base"] = base  # the same case again, so each lever compares within its own run
        cases["lever_fused_adamw"] = {**base, "optim": "adamw_torch_fused"}
        cases["lever_torch_compile"] = {**base, "torch_compile": True}  # last: compiling is slow
    if gpu:
        cases["gpu_matmul_peak"] = {"run": pre + "matmul_peak", "work": work, "device": "cuda"}
        cases["gpu_bert_base_128"] = {"run": pre + "hpcnlp", "work": work, "block": 128, "steps": 3 * s,
                                      "batch": 64, "warmup": 3, "bert_base": True, "bf16": True}
    cases["onnx_latency"] = {"run": "bench.onnx_latency.run"}
    if adapters:  # ~40 min of training on the full data: only with --only adapters (+ bench/results/adapters.*)
        cases["adapters"] = {"run": "bench.adapters.run"}
    if large:  # the Linux kernel source (bench/large.py): only with --only large...
        from bench.large import cases as large_cases

        cases.update(large_cases(work))
    return cases


def _rate(r: dict | None, key: str) -> float | None:
    return r.get(key) if r and "error" not in r else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(res: dict) -> dict:
    tps = lambda name: _rate(res.get(name), "tokens_per_second")  # noqa: E731
    sps = lambda name: _rate(res.get(name), "samples_per_second")  # noqa: E731
    peak = _rate(res.get("matmul_peak"), "gflops")
    flops = _rate(res.get("pretrain_hpcnlp_128"), "train_gflops_per_second")
    return {
        "pretrain_vs_run_mlm_128": _ratio(tps("pretrain_hpcnlp_128"), tps("pretrain_run_mlm_128")),
        "pretrain_vs_run_mlm_512": _ratio(tps("pretrain_hpcnlp_512"), tps("pretrain_run_mlm_512")),
        "pretrain_vs_seed_recipe": _ratio(tps("pretrain_hpcnlp_128"), tps("pretrain_seed_recipe")),
        "finetune_vs_seed_recipe": _ratio(sps("finetune_hpcnlp"), sps("finetune_seed_recipe")),
        "finetune_vs_run_glue": _ratio(sps("finetune_hpcnlp"), sps("finetune_run_glue")),
        "pretrain_mfu": round(flops / peak, 3) if flops and peak else None,
        **large_ratios(res),
    }


def _summary(results: dict, quick: bool, gpu: bool, seconds: float) -> dict:
    import torch

    return {
        "ratios": ratios(results),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": int(os.environ["OMP_NUM_THREADS"]), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if gpu else None},
        "gpu": None if gpu else "skipped: no CUDA device (torch.cuda.is_available() is False)",
        "quick": quick,
        "total_seconds": round(seconds, 1),
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny step counts")
    parser.add_argument("--levers", action="store_true", help="also measure the levers tried")
    parser.add_argument("--only", nargs="*", help="run only these case names (others: kept from summary.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    a = parser.parse_args()

    import torch

    from bench.summary import write

    gpu = torch.cuda.is_available()
    cases = plan(a.quick, a.levers, gpu, large=any(o.startswith("large") for o in a.only or ()),
                 adapters="adapters" in (a.only or ()))
    results = {}
    if a.only and (RESULTS / "summary.json").is_file():
        results = json.loads((RESULTS / "summary.json").read_text())["results"]
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    if not a.only:  # in this process: a loop of torch.mm needs no fresh interpreter
        from bench.pretrain import matmul_peak

        results["matmul_peak"] = matmul_peak(str(WORK))
        print(f"matmul peak: {results['matmul_peak']}", flush=True)
    for name, case in cases.items():
        if a.only and not any(name == o or name.startswith(o + "_") for o in a.only):  # `large`: its cases
            continue
        results[name] = r = run_isolated(case, a.timeout)
        brief = {k: r[k] for k in ("tokens_per_second", "samples_per_second", "eval_loss", "peak_rss_mb",
                                    "error", "log_tail", "wall_seconds") if k in r}
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {brief}", flush=True)
        summary = _summary(results, a.quick, gpu, time.perf_counter() - t0)
        write(summary, RESULTS)  # after every case: an interrupted run still leaves its numbers
    shutil.rmtree(WORK, ignore_errors=True)
    print(json.dumps(summary["ratios"], indent=2))
    print(f"results in {RESULTS}/summary.json, summary.md, *.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
