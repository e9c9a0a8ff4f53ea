"""`hpcnlp pretrain`: continued (domain-adaptive) masked-LM pretraining of an encoder.

config -> prepared (packed) corpus -> model (+ sparse MLM head) -> Trainer -> eval before/after
-> model, tokenizer, metrics.json, report.md, loss.png in output_dir.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from hpcnlp import checks
from hpcnlp.config import (
    AdapterConfig,
    ConfigError,
    CorpusConfig,
    Problem,
    Section,
    TrainingConfig,
    TrainingJobConfig,
    read_yaml,
    validate,
    with_overrides,
)
from hpcnlp.data.corpus import expand_files, read_documents
from hpcnlp.data.pack import corpus_split_problems
from hpcnlp.jobs import finetune
from hpcnlp.models import load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb
from hpcnlp.runtime import stack
from hpcnlp.runtime.io import atomic_write_json
from hpcnlp.spec import JobSpec, SlurmDefaults
from hpcnlp.train import adapters

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class ScratchModelConfig(Section):
    """Size of a model trained from scratch (`init: scratch`), with a WordPiece vocab from the corpus."""

    vocab_size: int = Field(8000, ge=100)
    hidden_size: int = Field(256, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class PretrainConfig(TrainingJobConfig):
    job: Literal["pretrain"] = "pretrain"
    model_name_or_path: str = "minilm-l6"  # local dir or an installed-package alias
    tokenizer_name_or_path: str | None = None  # default: the model's own; init scratch: trained on the corpus
    trust_remote_code: bool = False
    init: Literal["pretrained", "scratch"] = "pretrained"
    scratch: ScratchModelConfig = Field(default_factory=ScratchModelConfig)
    data: CorpusConfig
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_masking: bool = False
    # Dropout on attention probabilities while pretraining (None: the model's own, 0.1 for BERTs). 0 as in
    # Cramming (Geiping & Goldstein 2023) and ModernBERT: MLM's masking regularizes already, and dropout
    # there makes SDPA leave its fused CPU kernel for the math path and draw a mask the size of every
    # attention matrix (bench/results/profile_step.md: ~40% of a step at block 512). Training only: the
    # saved model's config keeps its own rate for fine-tuning.
    attention_dropout: float | None = Field(0.0, ge=0, lt=1)
    # Run the MLM head only where a token is masked (~15% of positions); see train/mlm.py.
    sparse_mlm_head: bool = True
    adapter: AdapterConfig | None = None  # LoRA instead of training the whole encoder (finetune: same key)
    # A checkpoint without a trained MLM head (the packaged MiniLM): for the first head_warmup_steps
    # optimizer steps only the head's own weights train, at head_learning_rate (None: training.learning_rate),
    # so its random gradients do not shake the encoder; then everything trains on the usual schedule.
    head_warmup_steps: int = Field(0, ge=0)
    head_learning_rate: float | None = Field(None, gt=0)
    # A finetune job config: after training, fine-tune from the starting model and from this output and
    # report both metrics and their difference (runs in <output_dir>-downstream/{base,adapted}).
    downstream: str | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    SETTING_FILES: ClassVar[tuple[str, ...]] = ("training.deepspeed", "downstream")

    def problems(self) -> list[Problem]:
        out = self.data.problems() + self.training.problems()
        if self.head_warmup_steps and 0 < self.training.max_steps <= self.head_warmup_steps:
            out.append(
                Problem(
                    key="head_warmup_steps",
                    message=f"{self.head_warmup_steps} head warm-up steps leave none of training.max_steps "
                    f"({self.training.max_steps}) for the encoder",
                    fix="set head_warmup_steps below training.max_steps (e.g. a tenth to a third of it)",
                )
            )
        if self.head_warmup_steps and self.adapter:
            out.append(
                Problem(
                    key="head_warmup_steps",
                    message="a LoRA adapter trains no MLM head to warm up",
                    fix="remove head_warmup_steps, or remove adapter:",
                )
            )
        if self.adapter and self.init == "scratch":
            out.append(
                Problem(
                    key="adapter",
                    message="LoRA adapts pretrained weights; init: scratch has none",
                    fix="remove adapter:, or use init: pretrained",
                )
            )
        if self.training.max_steps <= 0 and self.training.num_train_epochs <= 0:
            out.append(
                Problem(
                    key="training.max_steps",
                    message="nothing to train",
                    fix="set max_steps > 0 or num_train_epochs > 0",
                )
            )
        return out


def model_config(cfg: PretrainConfig) -> dict | None:
    """The sizes of the model trained (training.bf16: auto's probe)."""
    return cfg.scratch.model_dump() if cfg.init == "scratch" else checks.model_config(cfg.model_name_or_path)


def check(cfg: PretrainConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = corpus_split_problems(cfg.data) + checks.training(cfg.training, cfg.output_dir) + checks.resume(cfg)
    if cfg.init == "pretrained":
        out += checks.model("model_name_or_path", cfg.model_name_or_path, pending)
        out += checks.max_seq_length(cfg.data.max_seq_length, "model_name_or_path", cfg.model_name_or_path, pending)
    out += checks.model("tokenizer_name_or_path", cfg.tokenizer_name_or_path, pending)
    if cfg.init == "pretrained":
        out += adapters.check(cfg.adapter, cfg.model_name_or_path, pending, cfg.trust_remote_code)
    out += checks.overlaps(
        cfg.output_dir,
        {
            "model_name_or_path": cfg.model_name_or_path if cfg.init == "pretrained" else None,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
            "data.prepared_root": cfg.data.prepared_root,
        },
    )
    return out + checks.output_dir(cfg, cfg.resume) + _downstream_problems(cfg, pending)


def _downstream_runs(cfg: PretrainConfig) -> dict[str, str]:
    """name -> the model the downstream fine-tune starts from: the pretrain's own start and its output."""
    runs = {"base": cfg.model_name_or_path} if cfg.init == "pretrained" else {}
    return {**runs, "adapted": cfg.output_dir}


def _downstream_problems(cfg: PretrainConfig, pending: Iterable[str]) -> list[Problem]:
    """The downstream finetune config as it will run (from this output_dir), checked now."""
    if not cfg.downstream:
        return []
    try:
        ft = _downstream_config(cfg, _downstream_overrides(cfg, "adapted"))
        problems = ft.problems() + finetune.check(ft, [*pending, cfg.output_dir])
    except ConfigError as e:
        problems = e.problems
    return [
        Problem(
            key="downstream",
            message=f"{cfg.downstream}: {p.key}: {p.message}",
            fix=p.fix or "fix the downstream finetune config",
        )
        for p in problems
    ]


def _downstream_config(cfg: PretrainConfig, overrides: list[str] = ()) -> finetune.FinetuneConfig:
    raw = with_overrides(read_yaml(cfg.downstream), overrides)
    if raw.get("job", "finetune") != "finetune":
        raise ConfigError(
            cfg.downstream,
            [
                Problem(
                    key="job",
                    message=f"a '{raw.get('job')}' config, not finetune",
                    fix="give a finetune config (e.g. jobs/finetune-sentiment.yaml)",
                )
            ],
        )
    return validate(finetune.FinetuneConfig, {**raw, "job": "finetune"}, cfg.downstream)


def _downstream_dir(cfg: PretrainConfig, name: str) -> Path:
    """Next to output_dir, not in it: a job never writes inside its input model's dir."""
    return Path(f"{cfg.output_dir.rstrip('/')}-downstream") / name


def _downstream_overrides(cfg: PretrainConfig, name: str) -> list[str]:
    out = _downstream_dir(cfg, name)
    return [f"model_name_or_path={_downstream_runs(cfg)[name]}", f"output_dir={out}", "resume=auto"]


def _downstream_env() -> dict:
    """This process's environment less the process-group variables: the child is one process of its own."""
    import os

    drop = {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_RESTART_COUNT",
    }
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")}


def downstream(cfg: PretrainConfig) -> dict:
    """Fine-tune cfg.downstream from the starting model and from this output (each `hpcnlp finetune` in a
    subprocess, under <output_dir>-downstream/<name>; a finished one is reused) and compare their metric."""
    import subprocess
    import sys

    ft = _downstream_config(cfg)
    metric = ft.training.metric_for_best_model
    result: dict = {"config": cfg.downstream, "metric": metric}
    for name in _downstream_runs(cfg):
        out = _downstream_dir(cfg, name)
        if not (out / "metrics.json").is_file():
            log.info("downstream: fine-tuning %s from %s", cfg.downstream, _downstream_runs(cfg)[name])
            code = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "hpcnlp",
                    "finetune",
                    "--config",
                    cfg.downstream,
                    *_downstream_overrides(cfg, name),
                ],
                env=_downstream_env(),
            )
            if code != 0:
                result[name] = {"error": f"hpcnlp finetune exited {code}", "output_dir": str(out)}
                continue
        evals = json.loads((out / "metrics.json").read_text())["eval"]
        result[name] = {
            "output_dir": str(out),
            **{split: evals[split].get(metric) for split in ("validation", "test") if split in evals},
        }
    for split in ("validation", "test"):
        if all(isinstance(result.get(n, {}).get(split), (int, float)) for n in ("base", "adapted")):
            result[f"{split}_difference"] = result["adapted"][split] - result["base"][split]
    return result


def _scratch_tokenizer(cfg: PretrainConfig, args):
    """Train a WordPiece vocab on the corpus (rank 0), save it in output_dir, load it everywhere."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    path = Path(cfg.output_dir) / "scratch-tokenizer"
    with args.main_process_first(local=False, desc="scratch tokenizer"):  # shared FS: one writer
        if not (path / "tokenizer.json").is_file():
            wp = BertWordPieceTokenizer(lowercase=True)
            files = [f for s in cfg.data.source_list() for f in expand_files(s.files, s.exclude)]
            docs = (
                d["text"]
                for d in read_documents(
                    files, cfg.data.format, cfg.data.text_field, cfg.data.sample_by, cfg.data.encoding
                )
                if d["text"]
            )
            wp.train_from_iterator(docs, vocab_size=cfg.scratch.vocab_size, min_frequency=2)
            tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, model_max_length=cfg.data.max_seq_length)
            tok.save_pretrained(str(path))
        return BertTokenizerFast.from_pretrained(str(path))


def keep_pooler(source_dir: str, out: Path, prefix: str) -> None:
    """Carry the source model's pooler into the saved model. A masked-LM model has no pooler, so
    save_model drops it, and a classifier fine-tuned from this output would start from a random one
    (measured: macro F1 0.66 instead of 0.74 on Rotten Tomatoes). MLM training never touches it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src, dst = Path(source_dir) / "model.safetensors", out / "model.safetensors"
    if not (src.is_file() and dst.is_file()):
        return  # sharded or non-safetensors source: nothing to carry
    with safe_open(str(src), "pt") as f:
        pooler = {
            f"{prefix}.{k.removeprefix(prefix + '.')}": f.get_tensor(k) for k in f.keys() if ".pooler." in f".{k}"
        }
    tensors = load_file(str(dst))
    if not pooler or any(k in tensors for k in pooler):
        return
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({**tensors, **pooler}, str(tmp), metadata={"format": "pt"})
    tmp.replace(dst)  # atomic: never a half-written model.safetensors


def _eval(trainer, eval_ds) -> dict:
    m = trainer.evaluate(eval_ds)
    return {
        "loss": m["eval_loss"],
        "perplexity": math.exp(min(m["eval_loss"], 50)),
        "masked_accuracy": m.get("eval_masked_accuracy"),
    }


def prepared_data(cfg: PretrainConfig, tokenizer, world_size: int):
    """The prepared corpus. One process prepares it if missing (the demo's one command); a process
    group never does: its ranks would wait on one rank's hours of tokenizing under the collective
    timeout, on GPU nodes. It refuses, pointing at the prepare stage."""
    from hpcnlp.data.pack import find, fingerprint, prepare

    offsets = cfg.whole_word_masking
    if world_size == 1:
        return prepare(cfg.data, tokenizer, with_offsets=offsets)
    if found := find(cfg.data, tokenizer, offsets):
        return found
    raise ConfigError(cfg._source, [_not_prepared(cfg, fingerprint(cfg.data, tokenizer, offsets), world_size)])


def _not_prepared(cfg: PretrainConfig, fp: str, processes: int) -> Problem:
    where = Path(cfg.data.prepared_root) / fp
    return Problem(
        key="data",
        message=f"no prepared data at {where}, and a {processes}-process run does not tokenize",
        fix=f"run the prepare stage first: `hpcnlp prepare --config <a prepare config with data_from: "
        f"{cfg._source}>` (jobs/prepare.yaml; a Slurm array: sbatch --array=0-3 slurm/prepare.sbatch ...), "
        "as jobs/pipeline.yaml does",
    )


def group_check(cfg: PretrainConfig, processes: int) -> list[Problem]:
    """Before queueing a multi-process pretrain: its prepared data exists (it would refuse at start).
    Not knowable for init: scratch (the job trains its tokenizer) or a model an earlier stage writes."""
    from hpcnlp.data.pack import find, fingerprint

    if cfg.init == "scratch":
        return []
    if not stack.installed():  # the data's fingerprint needs the tokenizer
        stack.skipped("the prepared data of a multi-process pretrain")
        return []
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    except (OSError, ValueError):
        return []  # not there yet (an earlier stage's output) or unreadable: check() says which
    if find(cfg.data, tokenizer, cfg.whole_word_masking):
        return []
    return [_not_prepared(cfg, fingerprint(cfg.data, tokenizer, cfg.whole_word_masking), processes)]


def run(cfg: PretrainConfig) -> int:
    from hpcnlp.train.harness import TrainingRun
    from hpcnlp.train.mlm import (
        HeadWarmupTrainer,
        MLMCollator,
        enable_sparse_mlm_head,
        fixed_eval_masks,
        load_masked_lm,
        masked_accuracy,
        masked_predictions,
    )

    out = Path(cfg.output_dir)
    run = TrainingRun(cfg, model_config(cfg), remove_unused_columns=False)
    args = run.args
    if cfg.init == "scratch" and not cfg.tokenizer_name_or_path:
        tokenizer = _scratch_tokenizer(cfg, args)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    prepared = prepared_data(cfg, tokenizer, args.world_size)
    data = prepared.load()
    held = data["eval"]
    if cfg.data.max_eval_blocks and len(held) > cfg.data.max_eval_blocks:  # start-up must not grow with the corpus
        held = held.select(range(cfg.data.max_eval_blocks))
    eval_ds = fixed_eval_masks(held, tokenizer, cfg.mlm_probability, cfg.whole_word_masking, args.seed)

    model, head_new = load_masked_lm(cfg, tokenizer)
    if head_new and cfg.init == "pretrained" and not cfg.head_warmup_steps and not cfg.adapter:
        log.warning(
            "%s has no trained MLM head (a new one is initialised): its random gradients shake the encoder "
            "early on. Set head_warmup_steps (e.g. a fifth of training.max_steps) to train the head alone "
            "first",
            cfg.model_name_or_path,
        )
    sparse = cfg.sparse_mlm_head and enable_sparse_mlm_head(model)
    if cfg.adapter:  # after the sparse forward: peft calls the model's own forward
        model = adapters.wrap(model, cfg.adapter, None)
        log.info("adapter: %s", adapters.parameter_counts(model))
    trainer = run.trainer(
        trainer_class=HeadWarmupTrainer,
        model=model,
        train_dataset=data["train"],
        eval_dataset=eval_ds,
        data_collator=MLMCollator(tokenizer, cfg.mlm_probability, cfg.whole_word_masking, args.seed),
        processing_class=tokenizer,
        compute_metrics=masked_accuracy,
        preprocess_logits_for_metrics=masked_predictions,
    )
    trainer.head_warmup_steps, trainer.head_learning_rate = cfg.head_warmup_steps, cfg.head_learning_rate

    before_file = out / "eval_before.json"
    if run.checkpoint and before_file.is_file():
        before = json.loads(before_file.read_text())
    elif args.deepspeed:
        before = None  # ZeRO-1/2 cannot evaluate before train(); measured on a later plain run
        log.warning("deepspeed: skipping the before-training evaluation")
    else:
        before = _eval(trainer, eval_ds)
        # evaluate() marks the bare model as accelerate-"prepared"; left set, train() skips the DDP wrap
        # and every rank trains alone (seen with 2 processes: ranks' weights drift apart).
        model._is_accelerate_prepared = False
        if run.is_main:
            atomic_write_json(before_file, before)

    counts = adapters.parameter_counts(model)
    code = run.train()
    if code is not None:
        return code
    after = _eval(trainer, eval_ds)
    run.save()
    if not run.is_main:
        return 0
    if cfg.init == "pretrained":
        keep_pooler(resolve_model_path(cfg.model_name_or_path), out, model.base_model_prefix)
    metrics = {
        "job": "pretrain",
        "eval_before": before,
        "eval_after": after,
        **run.metrics(),
        "adapter": cfg.adapter.model_dump() if cfg.adapter else None,
        **counts,
        "sparse_mlm_head": sparse,
        "mlm_head_new": head_new,
        "head_warmup_steps": cfg.head_warmup_steps,
        "head_learning_rate": cfg.head_learning_rate if cfg.head_warmup_steps else None,
        "prepared": {"path": str(prepared.path), "reused": prepared.reused, **prepared.stats},
    }
    rows = [{"": "before", **(before or {})}, {"": "after", **after}]
    sections = []
    if cfg.downstream:  # the model is saved: fine-tune from it (and from the start) before metrics.json marks it done
        metrics["downstream"] = d = downstream(cfg)
        table = [{"model": n, **{k: v for k, v in d[n].items() if k != "output_dir"}} for n in _downstream_runs(cfg)]
        sections.append(
            (
                f"Downstream: {cfg.downstream} ({d['metric']})",
                markdown_table(table, ["model", "validation", "test", "error"])
                + "".join(
                    f"\n\nadapted - base, {s}: {d[f'{s}_difference']:+.4f}"
                    for s in ("validation", "test")
                    if f"{s}_difference" in d
                ),
            )
        )
    run.write_report(
        "Continued pretraining (masked LM)",
        metrics,
        [
            (
                "Held-out evaluation (same masked tokens before and after)",
                markdown_table(rows, ["", "loss", "perplexity", "masked_accuracy"]),
            ),
            (
                "Throughput",
                f"{metrics['tokens_per_second']} non-padding tokens/s, "
                f"{metrics['samples_per_second']} samples/s over {metrics['global_step']} steps, "
                f"world size {args.world_size}, peak RSS {metrics['peak_rss_mb']} MB",
            ),
            *sections,
        ],
        plot_title=f"MLM pretraining: {cfg.model_name_or_path}",
    )
    log.info(
        "perplexity %.2f -> %.2f; model, metrics.json and report.md in %s",
        (before or {}).get("perplexity", float("nan")),
        after["perplexity"],
        out,
    )
    return 0


def summary_row(cfg: PretrainConfig) -> dict:
    out = Path(cfg.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    before, after = m["eval_before"], m["eval_after"]
    return {
        "metric": (f"perplexity {before['perplexity']:.1f} -> " if before else "perplexity ")
        + f"{after['perplexity']:.1f}",
        "size": mb(out / "model.safetensors"),
    }


SPEC = JobSpec(
    name="pretrain",
    order=20,
    resumable=True,
    help="continued masked-LM pretraining; perplexity before/after",
    config=PretrainConfig,
    check=check,
    run=run,
    summary_row=summary_row,
    group_check=group_check,
    model_config=model_config,
    slurm=SlurmDefaults(nodes=2, time="04:00:00"),
)
