"""The sparse MLM head (train/mlm.py): same loss and gradients as the stock forward, a logged fallback,
a saved model that reloads with AutoModelForMaskedLM, and DDP.

Real MiniLM from the package, real Python-docs text; eval mode so dropout does not make the two
paths differ (gradients still flow in eval mode).
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from helpers import CORPUS, free_port

from hpcnlp.train.mlm import enable_sparse_mlm_head


def _batch(tokenizer, n=4, length=64, seed=0):
    from transformers import DataCollatorForLanguageModeling

    text = (CORPUS / "tutorial" / "controlflow.rst.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = length - 2
    rows = [
        {"input_ids": [tokenizer.cls_token_id, *ids[i * body : (i + 1) * body], tokenizer.sep_token_id]}
        for i in range(n)
    ]
    rows[-1]["input_ids"] = rows[-1]["input_ids"][: length // 2]  # one short row: padding is exercised
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed)(rows)


@pytest.fixture(scope="module")
def minilm_mlm(minilm_path):
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)  # the MLM head is not in the checkpoint: it is initialised
    return AutoModelForMaskedLM.from_pretrained(minilm_path).eval()


def test_sparse_loss_and_gradients_equal_stock(minilm_mlm, minilm_tokenizer):
    stock, sparse = minilm_mlm, copy.deepcopy(minilm_mlm)
    assert enable_sparse_mlm_head(sparse)
    batch = _batch(minilm_tokenizer)
    assert 0 < int((batch["labels"] != -100).sum()) < batch["labels"].numel() // 4

    stock.zero_grad()
    sparse.zero_grad()
    loss_stock = stock(**batch).loss
    loss_sparse = sparse(**batch).loss
    loss_stock.backward()
    loss_sparse.backward()
    assert abs(loss_stock.item() - loss_sparse.item()) < 1e-4
    grads_sparse = dict(sparse.named_parameters())
    for name, p in stock.named_parameters():
        g, h = p.grad, grads_sparse[name].grad
        assert g is not None and h is not None, name
        # encoder (bert.*) and head (cls.*) alike; the decoder weight is tied to the word embeddings
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_eval_predictions_match_stock_argmax(minilm_mlm, minilm_tokenizer):
    sparse = copy.deepcopy(minilm_mlm)
    enable_sparse_mlm_head(sparse)
    batch = _batch(minilm_tokenizer, seed=1)
    with torch.no_grad():
        dense = minilm_mlm(**batch).logits.argmax(-1)
        out = sparse(**batch)
        full = sparse(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no labels
    where = batch["labels"] != -100
    assert torch.equal(out.logits[where], dense[where])
    assert (out.logits[~where] == -100).all()
    assert full.logits.shape == (*batch["input_ids"].shape, minilm_mlm.config.vocab_size)  # inference: stock


def test_unknown_architecture_falls_back_to_stock_forward(caplog, minilm_tokenizer):
    """No packaged model of an unknown type exists here, so a tiny random ELECTRA generator stands in."""
    from transformers import ElectraConfig, ElectraForMaskedLM

    torch.manual_seed(0)
    model = ElectraForMaskedLM(
        ElectraConfig(
            vocab_size=minilm_tokenizer.vocab_size,
            embedding_size=32,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).eval()
    batch = _batch(minilm_tokenizer)
    with torch.no_grad():
        before = model(**batch).loss
    with caplog.at_level(logging.INFO, logger="hpcnlp.train.mlm"):
        assert enable_sparse_mlm_head(model) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "hpcnlp.train.mlm"]
    assert len(lines) == 1 and "electra" in lines[0] and "stock forward" in lines[0]
    assert "forward" not in vars(model)  # the class's own forward, untouched
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, before)


def test_saved_model_reloads_with_identical_weights(minilm_mlm, minilm_tokenizer, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = copy.deepcopy(minilm_mlm).train()
    enable_sparse_mlm_head(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**_batch(minilm_tokenizer)).loss.backward()
    opt.step()  # weights now differ from the checkpoint, the head included
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    saved = model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert (
        reloaded.cls.predictions.decoder.weight.data_ptr() == reloaded.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    batch = _batch(minilm_tokenizer, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, model.eval()(**batch).loss, rtol=1e-5, atol=1e-5)


def _ddp_worker(rank, world, port, path, batches, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForMaskedLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    enable_sparse_mlm_head(model)
    ddp = DistributedDataParallel(model)
    ddp(**batches[rank]).loss.backward()  # DDP calls the swapped forward; all-reduces the grads
    if rank == 0:
        torch.save(
            {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("bert.encoder")}, result_file
        )
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_average(minilm_path, minilm_mlm, minilm_tokenizer, tmp_path):
    """2 processes on gloo: DDP's averaged encoder gradients equal the mean of the per-batch ones.
    (The full job under `torchrun --nproc-per-node 2` is covered by the pretrain job's torchrun test.)"""
    import torch.multiprocessing as mp

    batches = [_batch(minilm_tokenizer, seed=s) for s in (3, 4)]
    port = free_port()
    result = tmp_path / "grads.pt"
    mp.start_processes(_ddp_worker, args=(2, port, minilm_path, batches, str(result)), nprocs=2, start_method="spawn")
    ddp_grads = torch.load(result)

    model = copy.deepcopy(minilm_mlm)
    enable_sparse_mlm_head(model)
    model.zero_grad()
    for b in batches:
        (model(**b).loss / 2).backward()
    for name, p in model.named_parameters():
        if name in ddp_grads:
            torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_head_stays_exact_in_bf16(minilm_mlm, minilm_tokenizer):
    """Under the Trainer's bf16 autocast the sparse head's loss is the fp32 loss within bf16 rounding,
    and the stock head's loss in bf16 (the head's logits go to the cross-entropy in fp32)."""
    stock, sparse = minilm_mlm, copy.deepcopy(minilm_mlm)
    assert enable_sparse_mlm_head(sparse)
    batch = _batch(minilm_tokenizer, seed=1)
    with torch.no_grad():
        fp32 = sparse(**batch).loss.item()
        with torch.autocast("cpu", torch.bfloat16):
            bf16, stock_bf16 = sparse(**batch).loss.item(), stock(**batch).loss.item()
    assert bf16 != fp32  # autocast really ran in bf16
    assert abs(bf16 - fp32) < 0.02 * fp32  # bf16 keeps 8 bits of mantissa: ~0.4% per op
    assert abs(bf16 - stock_bf16) < 0.01 * fp32


def test_attention_dropout_is_a_training_setting_the_saved_model_does_not_keep(minilm_tokenizer, tmp_path):
    """pretrain's attention_dropout (default 0) sets the attention modules' rate, for SDPA and eager alike,
    and leaves model.config alone: the saved model keeps BERT's 0.1 for whoever fine-tunes it. None keeps it."""
    from hpcnlp.jobs.pretrain import PretrainConfig
    from hpcnlp.train.mlm import load_masked_lm

    def cfg(**kw):
        return PretrainConfig(output_dir=str(tmp_path / "out"), data={"train_files": [str(CORPUS)]}, **kw)

    def rates(model):
        return {(m.dropout_prob, m.dropout.p) for m in model.modules() if hasattr(m, "dropout_prob")}

    assert PretrainConfig.model_fields["attention_dropout"].default == 0.0
    model, _ = load_masked_lm(cfg(), minilm_tokenizer)
    assert rates(model) == {(0.0, 0.0)} and len([m for m in model.modules() if hasattr(m, "dropout_prob")]) == 6
    model.train()
    batch = {k: v for k, v in _batch(minilm_tokenizer).items() if k != "labels"}
    for m in model.modules():  # hidden dropout off too: then two training-mode passes agree (SDPA drew no mask)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
    model.save_pretrained(tmp_path / "saved")
    assert '"attention_probs_dropout_prob": 0.1' in (tmp_path / "saved" / "config.json").read_text()
    kept, _ = load_masked_lm(cfg(attention_dropout=None), minilm_tokenizer)
    assert rates(kept) == {(0.1, 0.1)}
