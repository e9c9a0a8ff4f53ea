"""int8 recipes side by side for one model: dynamic, dynamic per-channel, static QDQ per-channel, then the
closest of those to PyTorch with its 1..N most sensitive MatMuls kept in fp32, the same MatMuls quantized
blockwise instead, and split where their input has outlier channels (those in fp32, the rest int8; dynamic
bases); fp32 where a weight is not a constant. validate's search takes split where outliers are found, else
blockwise or fp32 by a probe. Per recipe: metric drop and flip rate vs PyTorch on the eval set, edge-case
flips, batch-1 p50 latency, and whether the default gate passes it: the numbers `hpcnlp validate` judges
recipes by, without stopping at the first that passes.

    python -m bench.int8_recipes MODEL_DIR ONNX_DIR [--eval-samples 400] [--max-sensitive-nodes 3]

MODEL_DIR: the PyTorch model that was exported; ONNX_DIR: its `hpcnlp export` output_dir (model.onnx, a
plain graph: optimization_level 0). Data: the Rotten Tomatoes files unless --train/--eval say otherwise.
Short by design (a few hundred eval rows, 20 batch-1 runs per recipe): a minute or two for MiniLM-L6.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "classification" / "rotten-tomatoes"


def main(argv: list[str] | None = None) -> int:
    import torch

    from hpcnlp import tasks
    from hpcnlp.config import FinetuneDataConfig, LatencyConfig
    from hpcnlp.jobs.validate import ValidateConfig
    from hpcnlp.models import load_tokenizer
    from hpcnlp.report import markdown_table
    from hpcnlp.ship.edge_cases import edge_cases, run_edge_cases
    from hpcnlp.ship.int8_search import constant_weight_matmuls, measure_int8, outlier_inputs, sensitive_matmuls
    from hpcnlp.ship.measure import Reference, predict
    from hpcnlp.ship.quantize import Quantizer, Recipe, calibration_set
    from hpcnlp.tasks import auto_model_class, batches, label_names, load_data, task_of, torch_runner

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("onnx_dir")
    p.add_argument("--train", default=str(DATA / "train.csv"), help="calibration rows (static QDQ)")
    p.add_argument("--eval", default=str(DATA / "validation.csv"))
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-sensitive-nodes", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS)")
    args = p.parse_args(argv)

    cfg = ValidateConfig(
        name="bench",
        version="0",
        model_name_or_path=args.model_dir,
        onnx_dir=args.onnx_dir,
        data=FinetuneDataConfig(
            train_file=args.train,
            validation_file=args.eval,
            max_seq_length=args.max_seq_length,
            max_eval_samples=args.eval_samples,
        ),
        latency=LatencyConfig(batch_sizes=[1], seq_length=args.max_seq_length, repeats=20),
    )
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    task, names = task_of(args.model_dir), label_names(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir)
    data = load_data(task, cfg.data, tokenizer, args.model_dir)
    eval_ds, pad = data.splits["validation"], tokenizer.pad_token_id
    model = auto_model_class(task).from_pretrained(args.model_dir).eval()
    cases = edge_cases(tokenizer, cfg.data, task)
    sample = eval_ds.select(range(min(64, len(eval_ds))))
    ref = Reference(
        task,
        names,
        pad,
        eval_ds,
        sample,
        cases,
        predict(torch_runner(model), eval_ds, pad, tasks.get(task).token_level),
        run_edge_cases(torch_runner(model), cases),
    )
    onnx_dir = Path(args.onnx_dir)
    exported = json.loads((onnx_dir / "metrics.json").read_text()) if (onnx_dir / "metrics.json").is_file() else {}
    preset = (exported.get("quantization") or {}).get("preset", "avx2")

    results = [("fp32 (model.onnx)", measure_int8(onnx_dir / "model.onnx", ref, cfg, threads))]
    with tempfile.TemporaryDirectory(prefix="int8-recipes-") as work:
        quantizer = Quantizer(
            onnx_dir / "model.onnx",
            preset,
            lambda: calibration_set(data.splits["train"], 128, cfg.data.seed, pad, cfg.data.max_seq_length),
        )
        made = {}
        for recipe in (Recipe(), Recipe(per_channel=True), Recipe(static=True, per_channel=True)):
            made[recipe] = quantizer(recipe, Path(work) / f"int8-{len(made)}.onnx")
            results.append((recipe.name, measure_int8(made[recipe], ref, cfg, threads)))
        base = max(made, key=lambda r: dict(results)[r.name]["argmax_agreement"])
        ranked = sensitive_matmuls(onnx_dir / "model.onnx", made[base], (x for x, _ in batches(sample, 8, pad)))
        constant = constant_weight_matmuls(onnx_dir / "model.onnx")
        top_n = [n for n, _ in ranked[: args.max_sensitive_nodes] if n in constant]
        split = (
            {}
            if base.static
            else outlier_inputs(onnx_dir / "model.onnx", top_n, (x for x, _ in batches(sample, 8, pad)))
        )
        for k in range(1, args.max_sensitive_nodes + 1):
            top = [n for n, _ in ranked[:k]]
            recipes = [
                Recipe(base.static, base.per_channel, fp32_nodes=tuple(top)),
                Recipe(
                    base.static,
                    base.per_channel,
                    blockwise_nodes=tuple(n for n in top if n in constant),
                    fp32_nodes=tuple(n for n in top if n not in constant),
                ),
            ]
            if any(n in split for n in top):
                recipes.append(
                    Recipe(
                        base.static,
                        base.per_channel,
                        split_nodes=tuple((n, split[n]) for n in top if n in split),
                        fp32_nodes=tuple(n for n in top if n not in split),
                    )
                )
            for recipe in recipes:
                path = quantizer(recipe, Path(work) / f"int8-{len(results)}.onnx")
                results.append((recipe.name, measure_int8(path, ref, cfg, threads)))

    primary = tasks.get(task).primary_metric
    print(f"{args.model_dir} ({task}), {len(eval_ds)} eval rows of {args.eval}, preset {preset}, {threads} thread(s)")
    print(
        markdown_table(
            [
                {
                    "recipe": name,
                    f"{primary} drop": m["metric_drop"],
                    "flip rate": round(1 - m["argmax_agreement"], 4),
                    "edge-case flip rate": round(1 - m["edge_argmax_agreement"], 4),
                    "batch-1 p50 ms": m["latency_b1_p50_ms"],
                    "default gate": "pass" if m["passed"] else "fail",
                }
                for name, m in results
            ]
        )
    )
    print("outlier input channels:", ", ".join(f"{n} {list(c)}" for n, c in split.items()) or "none")
    print(
        "most sensitive MatMuls (relative output error) of",
        base.name + ":",
        ", ".join(f"{n} {e:.3f}" for n, e in ranked[: args.max_sensitive_nodes]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
