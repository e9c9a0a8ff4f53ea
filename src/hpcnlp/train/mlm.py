"""Masked-LM loss computed only where a token is masked.

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

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput

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


def _sparse_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                    return_dict=None):
    if labels is None:  # inference: the stock forward, full logits
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  **({"token_type_ids": token_type_ids} if token_type_ids is not None else {}))
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
        log.info("sparse MLM head: no recipe for model_type '%s'; using the stock forward "
                 "(head on every position)", model.config.model_type)
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
