"""Pretraining recipes, each trained for the same steps and scored on the same held-out masked tokens.

- hpcnlp: the pretrain job's own building blocks (prepare/pack, MLMCollator, sparse MLM head, attention_dropout,
  TrainingConfig -> TrainingArguments, Trainer), as the pretrain job (hpcnlp.jobs.pretrain) wires them.
- seed: the seeds' recipe, every line its own sample padded to max_length 512, stock collator,
  stock Trainer, stock *ForMaskedLM forward.
- run_mlm: HF `run_mlm.py` style: tokenize lines, `group_texts` into blocks, stock collator,
  stock Trainer, stock forward.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from transformers import set_seed

from bench.timing import CountingCollator, StepClock, peak_rss_mb, steady_rates
from hpcnlp.config import CorpusConfig, TrainingConfig
from hpcnlp.data.corpus import expand_files, read_documents
from hpcnlp.data.pack import prepare
from hpcnlp.jobs.pretrain import PretrainConfig
from hpcnlp.models import load_tokenizer
from hpcnlp.train.harness import training_arguments
from hpcnlp.train.mlm import (
    MLMCollator,
    build_masked_lm,
    enable_sparse_mlm_head,
    fixed_eval_masks,
    set_attention_dropout,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("BENCH_CORPUS", REPO / "data" / "corpus" / "python-docs"))
SEED = 42
EVAL_BLOCKS = 48  # held-out 128-token blocks every recipe is scored on (the faq/ files)


def corpus_files() -> tuple[list[str], list[str]]:
    """Held-out by file: faq/ is the eval text for every recipe, the rest is training text."""
    files = expand_files([str(CORPUS / "**" / "*.rst.txt")])
    held = [f for f in files if "/faq/" in f]
    return [f for f in files if f not in held], held


def corpus_config(block: int, work: str, **kw) -> CorpusConfig:
    train, held = corpus_files()
    return CorpusConfig(
        train_files=train,
        eval_files=held,
        max_seq_length=block,
        sample_by="paragraph",
        prepared_root=str(Path(work) / "prepared"),
        **kw,
    )


def training_args(work: str, steps: int, batch: int, **kw):
    """The pretrain job's TrainingArguments (hpcnlp.train.harness), `kw` being any TrainingArguments field."""
    cfg = TrainingConfig(
        learning_rate=1e-4,
        weight_decay=0.01,
        max_steps=steps,
        per_device_train_batch_size=batch,
        logging_steps=steps,
        eval_strategy="no",
        save_strategy="no",
        seed=SEED,
        **{"bf16": False, **kw},  # the bench times both dtypes itself: never training.bf16: auto's pick
    )
    return training_arguments(cfg, str(Path(work) / "trainer"))


def eval_set(tokenizer, work: str):
    """The same fixed-mask held-out blocks for every recipe (the pretrain job's own eval masking)."""
    data = prepare(corpus_config(128, work), tokenizer).load()
    held = data["eval"].select(range(min(EVAL_BLOCKS, len(data["eval"]))))
    return fixed_eval_masks(held, tokenizer, 0.15, False, SEED)


@torch.no_grad()
def eval_loss(model, tokenizer, ds) -> float:
    """Mean cross-entropy over all masked tokens of `ds` (each token weighs the same)."""
    from transformers import DataCollatorForTokenClassification

    pad = DataCollatorForTokenClassification(tokenizer)
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(ds), 16):
        batch = {k: v.to(device) for k, v in pad([ds[j] for j in range(i, min(i + 16, len(ds)))]).items()}
        n = int((batch["labels"] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return round(total / count, 4)


def train_flops(config, rates: dict, block: int, sparse: bool) -> float:
    """Training FLOPs actually computed (forward + backward = 3x forward) per second: the encoder's
    matmuls and attention on every position, the MLM head on the rows it really ran on."""
    d, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    encoder = layers * (4 * d * d + 2 * d * ffn)  # Q, K, V, O + the two FFN matmuls (weights per token)
    head = d * d + d * vocab  # transform + decoder
    positions = rates["positions"]
    head_rows = rates["labelled"] if sparse else positions
    attention = 2 * 2 * block * d * layers  # QK^T and AV, forward, per position
    forward = 2 * encoder * positions + attention * positions + 2 * head * head_rows
    return 3 * forward / rates["seconds"]


def _run(model, train_ds, collator, tokenizer, work, steps, batch, warmup, eval_ds, sparse, block, **args):
    from transformers import Trainer

    counts, clock = CountingCollator(collator, tokenizer.pad_token_id), StepClock()
    trainer = Trainer(
        model=model,
        args=training_args(work, steps, batch, **args),
        train_dataset=train_ds,
        data_collator=counts,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    rates = steady_rates(clock, counts, warmup)
    flops = train_flops(model.config, rates, block, sparse)
    # Evaluated as the Trainer evaluates a run of this dtype: under its bf16 autocast when it trained in bf16
    bf16 = bool(args.get("bf16"))
    t = time.process_time()
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, enabled=bf16):
        loss = eval_loss(model, tokenizer, eval_ds)
    return {
        **rates,
        "train_gflops_per_second": round(flops / 1e9, 2),
        "train_flops_per_token": round(flops * rates["seconds"] / rates["tokens"]),
        "eval_loss": loss,
        "eval_cpu_seconds": round(time.process_time() - t, 2),
        "steps": steps,
        "batch_size": batch,
        "block_size": block,
        "sparse_mlm_head": sparse,
        "dtype": "bf16" if bf16 else "fp32",
        "model_params_m": round(model.num_parameters() / 1e6, 1),
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        **_memory(),
    }


def _memory() -> dict:
    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def hpcnlp(
    work: str,
    block: int,
    steps: int,
    batch: int,
    warmup: int,
    sparse: bool = True,
    bert_base: bool = False,
    attention: str | None = None,
    **args,
) -> dict:
    """The pretrain job's path: packed blocks, MLMCollator, sparse head (unless turned off); `args` are
    TrainingConfig keys (bf16, optim, torch_compile, ...); `attention` sets attn_implementation."""
    tokenizer = load_tokenizer("minilm-l6")
    eval_ds = eval_set(tokenizer, work)
    data = prepare(corpus_config(block, work), tokenizer).load()
    cfg = PretrainConfig(output_dir=str(Path(work) / "out"), data=corpus_config(block, work))
    set_seed(SEED)  # the MLM head is not in the checkpoint: the same initial head in every case (as the job does)
    if bert_base:  # BERT-base size (12 x 768) from a config, random init (no weights needed): hidden sizes
        # this small model leaves under-used (AMX tiles, GPU tensor cores) show the real ceiling here
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    elif attention:  # BERT picks its attention classes when built (default sdpa): the eager-attention lever
        model = _stock_model(attn_implementation=attention)
    else:
        model = build_masked_lm(cfg, tokenizer)
    set_attention_dropout(model, cfg.attention_dropout)  # the job's default, on every branch's model
    used = sparse and enable_sparse_mlm_head(model)
    collator = MLMCollator(tokenizer, cfg.mlm_probability, cfg.whole_word_masking, SEED)
    return _run(
        model,
        data["train"],
        collator,
        tokenizer,
        work,
        steps,
        batch,
        warmup,
        eval_ds,
        used,
        block,
        remove_unused_columns=False,
        **args,
    )


def _lines(files: list[str]) -> list[str]:
    return [d["text"] for d in read_documents(files, "text", "text", "line") if d["text"].strip()]


def _stock_model(**kw):
    from transformers import AutoModelForMaskedLM

    from hpcnlp.models import resolve_model_path

    set_seed(SEED)
    return AutoModelForMaskedLM.from_pretrained(resolve_model_path("minilm-l6"), **kw)


def seed_recipe(work: str, steps: int, batch: int, warmup: int, **args) -> dict:
    """Every line its own sample, padded to 512, stock collator/Trainer/forward."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer("minilm-l6")
    eval_ds = eval_set(tokenizer, work)
    lines = Dataset.from_dict({"text": _lines(corpus_files()[0])})
    train = lines.map(
        lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=512),
        batched=True,
        remove_columns=["text"],
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    return _run(_stock_model(), train, collator, tokenizer, work, steps, batch, warmup, eval_ds, False, 512, **args)


def group_texts(examples, block_size: int):
    """`run_mlm.py`'s group_texts, verbatim in behaviour: concatenate, drop the remainder, cut blocks."""
    concatenated = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}


def run_mlm(work: str, block: int, steps: int, batch: int, warmup: int, **args) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer("minilm-l6")
    eval_ds = eval_set(tokenizer, work)
    lines = Dataset.from_dict({"text": _lines(corpus_files()[0])})
    tokenized = lines.map(
        lambda b: tokenizer(b["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]
    )
    train = tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": block})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    return _run(_stock_model(), train, collator, tokenizer, work, steps, batch, warmup, eval_ds, False, block, **args)


def matmul_peak(work: str, device: str = "cpu") -> dict:
    """fp32 and bf16 torch.mm peaks in one run: MFU is judged against the dtype trained in and the best one.
    `gflops` stays the fp32 figure (the key older summaries have)."""
    from bench.timing import matmul_peak_gflops

    if device == "cuda":
        bf16 = matmul_peak_gflops(8192, 5.0, "cuda", torch.bfloat16)
        return {"gflops": bf16, "gflops_bf16": bf16, "dtype": "bf16", "device": torch.cuda.get_device_name()}
    fp32, bf16 = matmul_peak_gflops(), matmul_peak_gflops(dtype=torch.bfloat16)
    return {
        "gflops": fp32,
        "gflops_fp32": fp32,
        "gflops_bf16": bf16,
        "best_dtype": "bf16" if bf16 > fp32 else "fp32",
        "threads": torch.get_num_threads(),
    }


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 2)
