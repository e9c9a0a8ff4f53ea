"""Masked-LM building blocks: the model, the masking collator, and the loss only where a token is masked.

The stock `*ForMaskedLM.forward` runs the MLM head (transform + vocab-sized decoder) on every
position, though only ~15% carry a label; for small encoders that head costs about as much as the
encoder itself. Here the encoder runs as usual, the hidden states at labelled positions are
gathered, and the model's *own* head modules run on those rows only. Same parameters, same loss
(mean cross-entropy over labelled positions), so a saved model reloads with AutoModelForMaskedLM
exactly as before. The forward is swapped on the instance, so DDP, DeepSpeed and the Trainer all
call it through the normal `model(**batch)` path.
"""

from __future__ import annotations

import logging
import types
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput

from hpcnlp.models import resolve_model_path
from hpcnlp.train.harness import ResumableTrainer

log = logging.getLogger(__name__)


def _distilbert_head(model, h):
    return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))


# model_type -> (encoder attribute, head applied to [n, hidden] rows)
HEADS = {
    "bert": ("bert", lambda m, h: m.cls(h)),
    "roberta": ("roberta", lambda m, h: m.lm_head(h)),
    "xlm-roberta": ("roberta", lambda m, h: m.lm_head(h)),
    "camembert": ("roberta", lambda m, h: m.lm_head(h)),
    "mpnet": ("mpnet", lambda m, h: m.lm_head(h)),
    "distilbert": ("distilbert", _distilbert_head),
}


def _sparse_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None):
    if labels is None:  # inference: the stock forward, full logits
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **({"token_type_ids": token_type_ids} if token_type_ids is not None else {}),
        )
    encoder_attr, head = HEADS[self.config.model_type]
    extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    hidden = getattr(self, encoder_attr)(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
    where = labels != -100
    logits = head(self, hidden[where])  # [n_masked, vocab]
    loss = F.cross_entropy(logits.float(), labels[where])
    preds = None
    if not self.training:  # eval: dense predictions (-100 where unmasked) for masked-token accuracy
        preds = torch.full_like(labels, -100)
        preds[where] = logits.argmax(-1)
    return MaskedLMOutput(loss=loss, logits=preds)


def enable_sparse_mlm_head(model) -> bool:
    """Swap in the sparse forward when the architecture is known; else keep the stock one (logged)."""
    if model.config.model_type not in HEADS:
        log.info(
            "sparse MLM head: no recipe for model_type '%s'; using the stock forward (head on every position)",
            model.config.model_type,
        )
        return False
    model.forward = types.MethodType(_sparse_forward, model)
    return True


def masked_predictions(logits, labels):
    """Trainer `preprocess_logits_for_metrics`: keep argmax ids only (vocab-sized logits never pile up)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits if logits.dim() == 2 else logits.argmax(-1)


def masked_accuracy(eval_pred) -> dict:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    where = labels != -100
    return {"masked_accuracy": float((preds[where] == labels[where]).mean()) if where.any() else 0.0}


# --- masking: what the collator does to each batch ------------------------------------------
class MLMCollator:
    """Masks training batches on the fly; eval batches arrive pre-masked (fixed masks) and are only padded,
    so perplexity before and after training is measured on the very same masked tokens.

    A training batch's masks are a pure function of (seed, batch content), not of the global RNG: a run
    resumed from a checkpoint masks every later batch exactly as the uninterrupted run did, whatever
    was prefetched before the save and however many dataloader workers there are.
    """

    def __init__(self, tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int):
        from transformers import DataCollatorForTokenClassification

        self.mask = masker(tokenizer, mlm_probability, whole_word_mask)
        self.pad = DataCollatorForTokenClassification(tokenizer)  # pads labels with -100
        self.seed = seed

    def __call__(self, features):
        if "labels" in features[0]:
            return self.pad(features)
        digest = zlib.crc32(b"".join(np.asarray(f["input_ids"], dtype=np.int32).tobytes() for f in features))
        self.mask.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + digest)
        return self.mask(_pad_offsets(features))


def _pad_offsets(features: list[dict]) -> list[dict]:
    """tokenizer.pad pads input_ids and special_tokens_mask but not offset_mapping (whole-word masking)."""
    if "offset_mapping" not in features[0]:
        return features
    n = max(len(f["input_ids"]) for f in features)
    return [
        {**f, "offset_mapping": list(f["offset_mapping"]) + [[0, 0]] * (n - len(f["offset_mapping"]))} for f in features
    ]


def masker(tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int | None = None):
    from transformers import DataCollatorForLanguageModeling

    # Whole-word masking only replaces with [MASK]; say so up front (transformers' own warning
    # for this case raises a TypeError in 4.57).
    replace = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
    return DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=mlm_probability, whole_word_mask=whole_word_mask, seed=seed, **replace
    )


def fixed_eval_masks(eval_ds, tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int):
    fixed = masker(tokenizer, mlm_probability, whole_word_mask, seed)

    def mask(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = fixed(_pad_offsets(rows))
        lengths = [len(r["input_ids"]) for r in rows]
        return {
            "input_ids": [ids[:n].tolist() for ids, n in zip(out["input_ids"], lengths)],
            "labels": [lab[:n].tolist() for lab, n in zip(out["labels"], lengths)],
        }

    # In memory (data.max_eval_blocks bounds it): datasets would otherwise write its cache file next to
    # the prepared shards, a dir shared by every run and rank.
    return eval_ds.map(mask, batched=True, batch_size=256, remove_columns=eval_ds.column_names, keep_in_memory=True)


def build_masked_lm(cfg, tokenizer):
    return load_masked_lm(cfg, tokenizer)[0]


def load_masked_lm(cfg, tokenizer):
    """A pretrain config's model (hpcnlp.jobs.pretrain.PretrainConfig: init, scratch, model_name_or_path).
    (model, head_new): head_new is True when the MLM head's own weights were not in the checkpoint
    (the packaged MiniLM ships without them) or the model is built from scratch; attention_dropout applied."""
    model, head_new = _load(cfg, tokenizer)
    if cfg.attention_dropout is not None:
        set_attention_dropout(model, cfg.attention_dropout)
    return model, head_new


def set_attention_dropout(model, p: float) -> int:
    """Dropout on the attention probabilities, for training only: the attention modules' own rate (what SDPA
    is called with, and eager attention's Dropout), never model.config, so the saved model keeps its own
    and a fine-tune from it uses that. BERT-style attention (BERT, RoBERTa, ELECTRA, MiniLM...): the
    modules with a `dropout_prob` beside a Dropout. Returns how many it set; 0 logs that nothing changed."""
    import torch

    n = 0
    for module in model.modules():
        if hasattr(module, "dropout_prob") and isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout_prob = module.dropout.p = p
            n += 1
    if not n:
        name = type(model).__name__
        log.warning("attention_dropout: %s has no BERT-style attention modules; its own rate stays", name)
    return n


def _load(cfg, tokenizer):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    if cfg.init == "scratch":
        s = cfg.scratch
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden_size,
            num_hidden_layers=s.num_hidden_layers,
            num_attention_heads=s.num_attention_heads,
            intermediate_size=s.intermediate_size,
            max_position_embeddings=max(512, cfg.data.max_seq_length),
            pad_token_id=tokenizer.pad_token_id,
        )
        return BertForMaskedLM(config), True
    model, info = AutoModelForMaskedLM.from_pretrained(
        resolve_model_path(cfg.model_name_or_path), trust_remote_code=cfg.trust_remote_code, output_loading_info=True
    )
    head = set(mlm_head_parameter_names(model))
    return model, any(k in head for k in info["missing_keys"])


def mlm_head_parameter_names(model) -> list[str]:
    """The MLM head's own parameters: all outside the encoder (base_model_prefix). The decoder weight is
    tied to the word embeddings, so named_parameters lists it once, under the encoder: it is not one."""
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


# --- head warm-up: a new MLM head learns before its gradients reach the encoder ---------------
class HeadWarmupTrainer(ResumableTrainer):
    """For the first `head_warmup_steps` optimizer steps only the MLM head's own parameters move (at
    `head_learning_rate`); then everything trains on the Trainer's usual schedule (warm-up and decay,
    shifted to start at that step and end at max_steps).

    Done with param groups and per-group LambdaLR multipliers, not requires_grad: every parameter keeps
    its gradient, so DDP's buckets and a resumed run's optimizer state look the same at every step, and
    the scheduler's step count (in its checkpointed state) decides the phase. An encoder group at lr 0
    stays bit-identical under AdamW (its update and its weight decay both scale with lr); its Adam
    moments do accumulate, so it starts with real gradient statistics."""

    head_warmup_steps = 0
    head_learning_rate: float | None = None

    def create_optimizer(self):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer()
        if not (fresh and self.head_warmup_steps):
            return optimizer
        names = set(mlm_head_parameter_names(self.model))
        head = {id(p) for n, p in self.model.named_parameters() if n in names}
        groups = list(optimizer.param_groups)
        optimizer.param_groups = []
        for g in groups:
            for is_head in (False, True):  # the encoder's group first: the logged lr is its lr (0 in the warm-up)
                params = [p for p in g["params"] if (id(p) in head) == is_head]
                if params:
                    lr = (self.head_learning_rate or self.args.learning_rate) if is_head else g["lr"]
                    optimizer.add_param_group({**g, "params": params, "lr": lr, "mlm_head": is_head})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.head_warmup_steps or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        optimizer = optimizer or self.optimizer
        n, rest = self.head_warmup_steps, max(num_training_steps - self.head_warmup_steps, 1)
        # The Trainer's own schedule (type, warm-up, kwargs) over the steps after the warm-up, as a function.
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        normal = get_scheduler(
            self.args.lr_scheduler_type,
            probe,
            num_warmup_steps=self.args.get_warmup_steps(rest),
            num_training_steps=rest,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        ).lr_lambdas[0]
        ratio = self.args.learning_rate / (self.head_learning_rate or self.args.learning_rate)

        def encoder(step):
            return 0.0 if step < n else normal(step - n)

        def head(step):  # its own constant rate first, then the encoder's
            return 1.0 if step < n else ratio * normal(step - n)

        self.lr_scheduler = LambdaLR(
            optimizer, [head if g.get("mlm_head") else encoder for g in optimizer.param_groups]
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler
