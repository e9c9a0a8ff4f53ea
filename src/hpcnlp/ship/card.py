"""MODEL_CARD.md: a bundle described so that it stands alone, wherever it is copied.

Hugging Face's model card format: YAML front matter (license, base model, data, metrics as a
model-index) written with huggingface_hub, then the lineage as a chain of stages named by content
hashes (never machine paths, which mean nothing on the reader's machine), the ONNX inputs and
outputs, the tokenizer, the CPU latency was measured on, and how to run and verify the bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hpcnlp import tasks
from hpcnlp.models import ALIASES, ModelNotFound, resolve_model_path
from hpcnlp.report import markdown_table
from hpcnlp.runtime import env
from hpcnlp.ship.bundle import SUMS, dir_sha256, sha256
from hpcnlp.tasks import cpu_text

MAX_STAGES = 20  # a chain longer than this is a loop of output dirs naming each other


def model_name(name_or_path: str) -> str:
    """An alias as it is, a dir by its own name: the rest of its path is this machine's."""
    return name_or_path if name_or_path in ALIASES else Path(name_or_path).resolve().name


def data_file(path: str) -> dict:
    return {"file": Path(path).name, "sha256": sha256(Path(path)) if Path(path).is_file() else None}


def data_files(data: dict) -> list[dict]:
    """Labelled data files by name and hash. Pretraining corpora (train_files, eval_files: globs or dirs,
    often many GB) by name only: hashing them would cost more than the card gains."""
    single = [data.get(k) for k in ("train_file", "validation_file", "test_file")]
    single += list((data.get("extra_eval_files") or {}).values())
    patterns = [p for k in ("train_files", "eval_files") for p in data.get(k) or []]
    patterns += [p for source in data.get("sources") or [] for p in source.get("files") or []]  # data.sources
    corpus = [{"file": Path(p).name, "sha256": None} for p in patterns]
    return [data_file(p) for p in single if p] + corpus


def readme_license(model_dir: str) -> str | None:
    """The license in a model's own card (README.md front matter), as Hugging Face models carry it."""
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license if readme.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def lineage(name_or_path: str) -> list[dict]:
    """The stages that made a model, base model first: {stage, model, sha256, data, license}.

    Each hpcnlp training job leaves config.resolved.yaml and metrics.json (written last) in its output
    dir, naming what it started from (for distill: its teacher) and its data. The chain starts at a
    model without them: one from elsewhere or a packaged alias (the base model), or a scratch pretraining.
    """
    chain: list[dict] = []
    while name_or_path and len(chain) < MAX_STAGES:
        try:
            path = Path(resolve_model_path(name_or_path))
        except ModelNotFound:  # gone since: its name is all that is known
            chain.append({"stage": "base", "model": model_name(name_or_path), "sha256": None, "data": []})
            break
        stage = {"model": model_name(name_or_path), "sha256": dir_sha256(path)}
        if not ((path / "config.resolved.yaml").is_file() and (path / "metrics.json").is_file()):
            chain.append({"stage": "base", **stage, "data": [], "license": readme_license(str(path))})
            break
        job = yaml.safe_load((path / "config.resolved.yaml").read_text()) or {}
        # A pretraining corpus is named by its prepared data's fingerprint (files, sizes, tokenizer, settings).
        prepared = (json.loads((path / "metrics.json").read_text()).get("prepared") or {}).get("fingerprint")
        chain.append(
            {
                "stage": job.get("job"),
                **stage,
                "data": data_files(job.get("data") or {}),
                "corpus_fingerprint": prepared,
            }
        )
        name_or_path = None if job.get("init") == "scratch" else job.get("teacher") or job.get("model_name_or_path")
        if isinstance(name_or_path, list):  # an ensemble of teachers: the chain follows the first
            name_or_path = name_or_path[0]
    return chain[::-1]


def onnx_signature(path: Path) -> list[dict]:
    """Inputs and outputs of an ONNX graph: name, dtype, shape (a named axis is dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    rows = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in (v for v in values if v.name not in weights):
            t = v.type.tensor_type
            rows.append(
                {
                    "io": kind,
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": "[" + ", ".join(d.dim_param or str(d.dim_value) for d in t.shape.dim) + "]",
                }
            )
    return rows


def tokenizer_settings(bundle: Path) -> dict:
    tok = json.loads((bundle / "tokenizer.json").read_text())
    config = bundle / "tokenizer_config.json"
    tc = json.loads(config.read_text()) if config.is_file() else {}
    normalizer = tok.get("normalizer") or {}
    return {
        "type": (tok.get("model") or {}).get("type"),
        "class": tc.get("tokenizer_class"),
        "lowercase": tc.get("do_lower_case", normalizer.get("lowercase")),
        "model_max_length": tc.get("model_max_length"),
    }


def _hashed(entry: dict) -> str:
    return f"`{entry['file']}` (sha256 `{entry['sha256']}`)" if entry.get("sha256") else f"`{entry['file']}`"


def model_files_text(bundle: Path, models: list[str]) -> str:
    """Each model with its sha256, and the external data files it keeps its weights in (over 2 GB)."""
    from hpcnlp.ship.onnx import external_data_files

    return ", ".join(
        f"`{n}` (sha256 `{sha256(bundle / n)}`)"
        + "".join(f" with external data `{d}` (sha256 `{sha256(bundle / d)}`)" for d in external_data_files(bundle / n))
        for n in models
    )


def model_card(cfg, bundle: Path, task: str, names: list[str], results: dict, passed: bool) -> str:
    """MODEL_CARD.md of the bundle being built in `bundle` (its files final, but for the card and manifest)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    chain = lineage(cfg.model_name_or_path)
    base = chain[0]
    export_file = Path(cfg.onnx_dir) / "metrics.json"
    export = json.loads(export_file.read_text()) if export_file.is_file() else {}
    quant = export.get("quantization") or {}
    models = [n for n in ("model.onnx", "model.int8.onnx") if (bundle / n).is_file()]
    evals = {"validation": (data_file(cfg.data.validation_file or cfg.data.train_file), "metrics")}
    if results.get("test_metrics"):
        evals["test"] = (data_file(cfg.data.test_file), "test_metrics")
    pipeline_tag = tasks.get(task).optimum_task  # Optimum names tasks as the Hub does its pipeline tags

    datasets = []
    for entry in [d for stage in chain for d in stage["data"]] + [f for f, _ in evals.values()]:
        text = f"{entry['file']} sha256:{entry['sha256']}" if entry["sha256"] else entry["file"]
        datasets += [text] if text not in datasets else []
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=f["file"],
            dataset_name=f["file"],
            dataset_split=split,
            dataset_revision=f["sha256"],
            metric_type=metric,
            metric_value=float(value),
            metric_name=f"{metric} ({runtime})",
            metric_config=runtime,
        )
        for split, (f, key) in evals.items()
        for runtime, scores in results[key].items()
        for metric, value in scores.items()
    ]
    data = ModelCardData(
        model_name=f"{cfg.name}-{cfg.version}",
        license=base.get("license") or cfg.license,
        base_model=base["model"],
        datasets=datasets,
        language=cfg.language,
        pipeline_tag=pipeline_tag,
        library_name="onnx",
        tags=["onnx", "hpcnlp", task] + (["int8"] if "model.int8.onnx" in models else []),
        metrics=sorted({m for scores in results["metrics"].values() for m in scores}),
        eval_results=eval_results,
    )

    steps = []
    for s in chain:
        made = f"`{s['model']}`" + (f" (sha256 `{s['sha256']}`)" if s["sha256"] else "")
        if s["stage"] == "base":
            steps.append(f"base model {made}, license {s.get('license') or 'not stated'}")
        else:
            on = f" on {', '.join(_hashed(d) for d in s['data'])}" if s["data"] else ""
            on += f" (prepared corpus fingerprint `{s['corpus_fingerprint']}`)" if s.get("corpus_fingerprint") else ""
            steps.append(f"{s['stage']}{on} -> {made}")
    steps[-1] += ": the PyTorch reference of this validation"
    int8 = (
        f", int8 {quant.get('mode')} (preset {quant.get('preset')}, per-channel {quant.get('per_channel')})"
        if quant
        else ""
    )
    steps.append(
        f"export to ONNX opset {export.get('opset', '?')}, ORT optimization "
        f"O{export.get('optimization_level', 0)}{int8} -> " + model_files_text(bundle, models)
    )
    steps.append(
        f"validate on {_hashed(evals['validation'][0])}: {'PASSED' if passed else 'REJECTED'} "
        f"(hpcnlp code `{env.code_version()}`)"
    )

    tok = tokenizer_settings(bundle)
    metric_sections = []
    for split, (f, key) in evals.items():
        n = results["eval_examples"] if split == "validation" else results["test_examples"]
        rows = [{"model": k, **v} for k, v in results[key].items()]
        held = (
            f", the {cfg.data.validation_split:.0%} held out of it (seed {cfg.data.seed})"
            if split == "validation" and not cfg.data.validation_file
            else ""
        )
        metric_sections += [f"{split.capitalize()}: {n} examples of {_hashed(f)}{held}.", "", markdown_table(rows), ""]
    has_int8 = "model.int8.onnx" in models
    run = f'python onnx_inference.py . "{tasks.get(task).example_text}"'
    body = "\n".join(
        [
            f"# {cfg.name} {cfg.version}",
            "",
            f"**{'Validated' if passed else 'REJECTED'}** {pipeline_tag} model in ONNX: "
            + ", ".join(f"`{n}`" for n in models)
            + ".",
            "",
            "## Labels",
            "",
            ", ".join(f"`{n}`" for n in names),
            "",
            "## Lineage",
            "",
            "Each stage, oldest first, with the sha256 of what it made (of a model dir: of its "
            "top-level files' names and contents) and of its data files:",
            "",
            *[f"{i}. {s}" for i, s in enumerate(steps, 1)],
            "",
            "## Inputs and outputs",
            "",
            markdown_table(onnx_signature(bundle / "model.onnx")),
            "",
            "Named axes are dynamic (any batch size, any length up to the model's maximum). Token ids come from "
            f"`tokenizer.json`: {tok['type']} ({tok['class']}), lowercase {tok['lowercase']}, model_max_length "
            f"{tok['model_max_length']}. Evaluated with inputs truncated to {cfg.data.max_seq_length} tokens "
            f"(`onnx_inference.py --max-length {cfg.data.max_seq_length}`).",
            "",
            "## Metrics",
            "",
            *metric_sections,
            f"The gate judges {tasks.get(task).primary_metric} on the validation data; its checks, measured values and "
            "latency are in validation.md.",
            "",
            f"Latency was measured on {cpu_text(results['cpu'])}, {results['threads']} thread(s).",
            "",
            "## Limits",
            "",
            f"- Inputs longer than {cfg.data.max_seq_length} tokens were truncated in evaluation; the model "
            "saw no longer ones.",
            "- Scores hold for data like the evaluation set; other domains need their own check.",
            "- int8 kernels differ by CPU (the ISA flags above): re-run `hpcnlp validate` on the target CPU type."
            if has_int8
            else "",
            "",
            "## How to run",
            "",
            "Needs only `onnxruntime`, `tokenizers` and `numpy` (no torch, no transformers):",
            "",
            "```bash",
            run,
            'python onnx_inference.py --model model.int8.onnx . "..."   # the int8 model' if has_int8 else "",
            "```",
            "",
            'In your own onnxruntime session on CPU, pass `disabled_optimizers=["SkipLayerNormFusion"]` as '
            "onnx_inference.py does: the latency above was measured so (onnxruntime's fused kernel is slower on CPU "
            "than the two ops it replaces).",
            "",
            "## How to verify",
            "",
            "In this directory, either of:",
            "",
            "```bash",
            f"sha256sum -c {SUMS}   # every file's checksum, with coreutils only",
            "hpcnlp verify .          # checksums and sizes against manifest.json, nothing unlisted, the gate "
            "passed, ONNX models load",
            "```",
            "",
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
