"""`python -m bench` (make bench): every case in its own process, then summary.json/.md and charts.

--quick: a smoke run with tiny step counts (rates meaningless); --levers: also measure the levers
tried on the hpcnlp path: fused AdamW and torch.compile in fp32; in bf16 batch 32, fused AdamW, eager
attention (SDPA is the default), 2 threads and torch.compile. The matmul peaks (fp32 and bf16), the
CPU model and its ISA flags are recorded in the same run: MFU is against the dtype trained in and the best.
"""

from __future__ import annotations

import argparse
import json
import os
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
from bench.timing import mfu, run_isolated  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "outputs" / "bench"


def plan(
    quick: bool, levers: bool, gpu: bool, large: bool = False, adapters: bool = False, quality: bool = False
) -> dict[str, dict]:
    """name -> case. Steps: enough steady steps for a rate on 2 busy cores; the seed recipe is ~40x
    slower per real token, so it gets fewer (a rate needs few)."""
    # 8 steady steps, not 4: the bf16-vs-run_mlm ratios moved 2.7-4.3x between runs at 4
    s, s_seed, w = (3, 2, 1) if quick else (11, 3, 3)
    # Fine-tuning: hpcnlp's batches differ in length (length-grouped, random order; the longest comes
    # first), so it needs many steps for a fair mean; padded recipes cost the same every step.
    f_dyn, f, f_seed = (3, 3, 2) if quick else (40, 10, 3)
    work = str(WORK)
    pre = "bench.pretrain."
    cases = {}
    for times, num_proc in ((1, 1), (4, 1), (4, 2), (16, 1)):
        if quick and times > 4:
            continue
        cases[f"prepare_x{times}_np{num_proc}"] = {
            "run": "bench.prepare.run",
            "work": work,
            "times": times,
            "num_proc": num_proc,
        }
    b = 8  # 8 x 128 = 1024 tokens per step at every block size: 8 x 128, 4 x 256, 2 x 512
    cases.update(
        {
            "pretrain_hpcnlp_128": {
                "run": pre + "hpcnlp",
                "work": work,
                "block": 128,
                "steps": s,
                "batch": b,
                "warmup": w,
            },
            "pretrain_run_mlm_128": {
                "run": pre + "run_mlm",
                "work": work,
                "block": 128,
                "steps": s,
                "batch": b,
                "warmup": w,
            },
            "pretrain_hpcnlp_256": {
                "run": pre + "hpcnlp",
                "work": work,
                "block": 256,
                "steps": s,
                "batch": b // 2,
                "warmup": w,
            },
            "pretrain_hpcnlp_512": {
                "run": pre + "hpcnlp",
                "work": work,
                "block": 512,
                "steps": s,
                "batch": b // 4,
                "warmup": w,
            },
            "pretrain_run_mlm_512": {
                "run": pre + "run_mlm",
                "work": work,
                "block": 512,
                "steps": s,
                "batch": b // 4,
                "warmup": w,
            },
            "pretrain_seed_recipe": {
                "run": pre + "seed_recipe",
                "work": work,
                "steps": s_seed,
                "batch": b // 4,
                "warmup": 1,
            },
            "finetune_hpcnlp": {"run": "bench.finetune.hpcnlp", "work": work, "steps": f_dyn, "batch": 16, "warmup": w},
            "finetune_run_glue": {
                "run": "bench.finetune.padded",
                "work": work,
                "steps": f,
                "batch": 16,
                "warmup": w,
                "max_length": 128,
            },
            "finetune_seed_recipe": {
                "run": "bench.finetune.padded",
                "work": work,
                "steps": f_seed,
                "batch": 16,
                "warmup": 1,
                "max_length": 512,
            },
        }
    )
    # bf16 (the Trainer's own autocast, training.bf16: true) on the same cases; BERT-base size as a second model
    bf16 = {"bf16": True}
    cases.update(
        {
            "pretrain_hpcnlp_bf16_128": {**cases["pretrain_hpcnlp_128"], **bf16},
            "pretrain_hpcnlp_bf16_512": {**cases["pretrain_hpcnlp_512"], **bf16},
            "finetune_hpcnlp_bf16": {**cases["finetune_hpcnlp"], **bf16},
            "pretrain_bert_base_128": {**cases["pretrain_hpcnlp_128"], "bert_base": True},
            "pretrain_bert_base_bf16_128": {**cases["pretrain_hpcnlp_128"], "bert_base": True, **bf16},
        }
    )
    if levers:
        base = cases["pretrain_hpcnlp_128"]
        cases["lever_base"] = base  # the same case again, so each lever compares within its own run
        cases["lever_fused_adamw"] = {**base, "optim": "adamw_torch_fused"}
        cases["lever_torch_compile"] = {**base, "torch_compile": True}  # slow: compiling
        # the next levers in bf16, each against lever_bf16_base (summary.md)
        b16 = cases["pretrain_hpcnlp_bf16_128"]
        cases["lever_bf16_base"] = b16
        cases["lever_bf16_batch32"] = {**b16, "batch": 32}
        cases["lever_bf16_fused_adamw"] = {**b16, "optim": "adamw_torch_fused"}
        cases["lever_bf16_eager_attention"] = {**b16, "attention": "eager"}  # sdpa is BERT's default
        cases["lever_bf16_threads2"] = {**b16, "threads": 2}
        cases["lever_bf16_torch_compile"] = {**b16, "torch_compile": True}
    if gpu:
        cases["gpu_matmul_peak"] = {"run": pre + "matmul_peak", "work": work, "device": "cuda"}
        cases["gpu_bert_base_128"] = {
            "run": pre + "hpcnlp",
            "work": work,
            "block": 128,
            "steps": 3 * s,
            "batch": 64,
            "warmup": 3,
            "bert_base": True,
            "bf16": True,
        }
    cases["onnx_latency"] = {"run": "bench.onnx_latency.run"}
    if adapters:  # ~40 min of training on the full data: only with --only adapters (+ bench/results/adapters.*)
        cases["adapters"] = {"run": "bench.adapters.run"}
    if quality:  # hours of CPU (bench/quality.py; `python -m bench.quality` shows progress and takes knobs)
        cases["quality"] = {"run": "bench.quality.run", "timeout_s": 48 * 3600}
    if large:  # the Linux kernel source (bench/large.py): only with --only large...
        from bench.large import cases as large_cases

        cases.update(large_cases(work))
    return cases


def _ok(res: dict, name: str) -> dict | None:
    return res[name] if name in res and "error" not in res[name] else None


def _rate(r: dict | None, key: str) -> float | None:
    return r.get(key) if r and "error" not in r else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _best_mfu(res: dict, peak: dict | None, *names: str) -> float | None:
    """The faster dtype's run of a model, against the best dtype's peak: how much of the machine it uses."""
    runs = [mfu(_ok(res, n), peak).get("mfu_best_dtype") for n in names]
    return max((v for v in runs if v), default=None)


def int8_vs_best_fp32(res: dict, batch: str = "1") -> float | None:
    """Teacher int8 ONNX against the faster of PyTorch fp32 and ONNX fp32 (p50 latency)."""
    t = (_ok(res, "onnx_latency") or {}).get("teacher", {})
    try:
        fp32 = min(t["pytorch"][f"batch{batch}"]["p50_ms"], t["onnx_fp32"][f"batch{batch}"]["p50_ms"])
        return round(fp32 / t["onnx_int8"][f"batch{batch}"]["p50_ms"], 2)
    except KeyError:
        return None


def ratios(res: dict) -> dict:
    tps = lambda name: _rate(res.get(name), "tokens_per_second")  # noqa: E731
    sps = lambda name: _rate(res.get(name), "samples_per_second")  # noqa: E731
    peak = _ok(res, "matmul_peak")
    return {
        "pretrain_vs_run_mlm_128": _ratio(tps("pretrain_hpcnlp_128"), tps("pretrain_run_mlm_128")),
        "pretrain_vs_run_mlm_512": _ratio(tps("pretrain_hpcnlp_512"), tps("pretrain_run_mlm_512")),
        "pretrain_vs_seed_recipe": _ratio(tps("pretrain_hpcnlp_128"), tps("pretrain_seed_recipe")),
        "finetune_vs_seed_recipe": _ratio(sps("finetune_hpcnlp"), sps("finetune_seed_recipe")),
        "finetune_vs_run_glue": _ratio(sps("finetune_hpcnlp"), sps("finetune_run_glue")),
        "pretrain_mfu": mfu(_ok(res, "pretrain_hpcnlp_128"), peak).get("mfu"),
        "pretrain_bf16_vs_run_mlm_128": _ratio(tps("pretrain_hpcnlp_bf16_128"), tps("pretrain_run_mlm_128")),
        "pretrain_bf16_vs_run_mlm_512": _ratio(tps("pretrain_hpcnlp_bf16_512"), tps("pretrain_run_mlm_512")),
        "finetune_bf16_vs_run_glue": _ratio(sps("finetune_hpcnlp_bf16"), sps("finetune_run_glue")),
        "pretrain_mfu_best_dtype": _best_mfu(res, peak, "pretrain_hpcnlp_128", "pretrain_hpcnlp_bf16_128"),
        "pretrain_mfu_best_dtype_bert_base": _best_mfu(
            res, peak, "pretrain_bert_base_128", "pretrain_bert_base_bf16_128"
        ),
        "int8_vs_best_fp32_b1": int8_vs_best_fp32(res),
        "int8_vs_pytorch_bf16_b1": (_ok(res, "onnx_latency") or {})
        .get("teacher", {})
        .get("int8_vs_pytorch_bf16", {})
        .get("1"),
        "int8_accuracy_drop_points": (_ok(res, "onnx_latency") or {})
        .get("teacher", {})
        .get("int8_accuracy_drop_points"),
        **large_ratios(res),
    }


def _summary(results: dict, quick: bool, gpu: bool, seconds: float) -> dict:
    import torch

    from hpcnlp.tasks import cpu as cpu_info

    cpu = cpu_info()
    return {
        "ratios": ratios(results),
        "machine": {
            "cpu": cpu["model"],
            "cpu_flags": cpu["flags"],
            "cores": os.cpu_count(),
            "torch_threads": int(os.environ["OMP_NUM_THREADS"]),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if gpu else None,
        },
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
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per case (onnx_latency first trains its two models)"
    )
    a = parser.parse_args()

    import torch

    from bench.summary import write

    gpu = torch.cuda.is_available()
    cases = plan(
        a.quick,
        a.levers,
        gpu,
        large=any(o.startswith("large") for o in a.only or ()),
        adapters="adapters" in (a.only or ()),
        quality="quality" in (a.only or ()),
    )
    results = {}
    if a.only and (RESULTS / "summary.json").is_file():
        results = json.loads((RESULTS / "summary.json").read_text())["results"]
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    if not a.only or "matmul_peak" in a.only:  # in this process: a torch.mm loop needs no fresh interpreter
        from bench.pretrain import matmul_peak

        results["matmul_peak"] = matmul_peak(str(WORK))
        print(f"matmul peak: {results['matmul_peak']}", flush=True)
    for name, case in cases.items():
        if a.only and not any(name == o or name.startswith(o + "_") for o in a.only):  # `large`: its cases
            continue
        settings = dict(case)
        results[name] = r = run_isolated(settings, settings.pop("timeout_s", a.timeout))
        brief = {
            k: r[k]
            for k in (
                "tokens_per_second",
                "samples_per_second",
                "eval_loss",
                "peak_rss_mb",
                "error",
                "log_tail",
                "wall_seconds",
            )
            if k in r
        }
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {brief}", flush=True)
        summary = _summary(results, a.quick, gpu, time.perf_counter() - t0)
        write(summary, RESULTS)  # after every case: an interrupted run still leaves its numbers
    shutil.rmtree(WORK, ignore_errors=True)
    print(json.dumps(summary["ratios"], indent=2))
    print(f"results in {RESULTS}/summary.json, summary.md, *.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
