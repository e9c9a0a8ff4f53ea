"""LoRA adapters through peft: which modules get them, the check, the wrap, and the two outputs.

A model with `adapter:` trains low-rank updates of the encoder's linear layers plus its task head in
full (peft's `modules_to_save`); everything else stays frozen. At the end the job writes the adapter
alone (`<output_dir>/adapter/`: adapter_model.safetensors + adapter_config.json, a few MB) and the
merged model (`merge_and_unload`: a plain model of the base architecture, no LoRA ops) to output_dir,
so distill, export and validate take it like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hpcnlp.config import AdapterConfig, Problem
from hpcnlp.runtime import stack
from hpcnlp.runtime.io import is_inside

# model_type -> every linear layer of attention and FFN, as names inside an encoder layer (peft matches
# a module whose name is, or ends with ".", one of these). All linear layers, not only query/value
# (peft's own default): on small encoders q/v alone learn far less per epoch.
_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": _BERT_LIKE,  # also MiniLM (a BertModel)
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"],
}


def target_modules(adapter: AdapterConfig, model_type: str) -> list[str] | None:
    return adapter.target_modules or DEFAULT_TARGETS.get(model_type)


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def layer_linear_names(model) -> list[str]:
    """Names of the linear layers inside one encoder layer (what target_modules may name)."""
    import torch

    from hpcnlp.models import encoder_layers

    parent, attr = encoder_layers(model)
    layer = getattr(parent, attr)[0]
    return sorted(n for n, m in layer.named_modules() if n and isinstance(m, torch.nn.Linear))


def check(
    adapter: AdapterConfig | None, name_or_path: str | None, pending: Iterable[str], trust_remote_code: bool = False
) -> list[Problem]:
    """Target modules the model has (built empty from its config.json: no weights are read)."""
    if adapter is None or name_or_path is None or is_inside(name_or_path, pending):
        return []
    if not stack.installed():  # the model is built (empty) by transformers
        stack.skipped("adapter.target_modules")
        return []
    import torch
    from transformers import AutoConfig, AutoModel

    from hpcnlp.models import ModelNotFound, resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        names = layer_linear_names(model)
    except (ModelNotFound, OSError, ValueError):
        return []  # the model check reports a model that cannot be read
    targets = target_modules(adapter, config.model_type)
    if targets is None:
        return [
            Problem(
                key="adapter.target_modules",
                message=f"no default for model_type '{config.model_type}'",
                fix=f"list some of its layers' linear modules: {names}",
            )
        ]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        return [
            Problem(
                key="adapter.target_modules",
                message=f"{missing} not in the encoder layers of '{name_or_path}' ({config.model_type})",
                fix=f"use some of the modules it has: {names}",
            )
        ]
    return []


def head_modules(model) -> list[str]:
    """The task head: every module outside the base model, minus weights tied to the input embeddings
    (a masked-LM decoder is the embedding matrix: training a copy of it would untie it and train 12M+
    parameters). These train in full (peft modules_to_save)."""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}

    def walk(prefix: str, module) -> list[str]:
        if not any(True for _ in module.parameters()):
            return []
        if not any(id(p) in tied for p in module.parameters()):
            return [prefix]
        return [n for name, child in module.named_children() for n in walk(f"{prefix}.{name}", child)]

    return [n for name, child in model.named_children() if name != model.base_model_prefix for n in walk(name, child)]


def wrap(model, adapter: AdapterConfig, task_type: str | None):
    """The model as a PeftModel: LoRA on the target modules, the head trainable, the rest frozen.
    `task_type`: peft's TaskType name (the task's peft_task_type); None: a plain encoder (masked LM)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType[task_type] if task_type else None
    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        target_modules=target_modules(adapter, model.config.model_type),
        modules_to_save=head_modules(model),
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def is_adapter_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def parameter_counts(model) -> dict:
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


def save_adapter(model, path: Path) -> None:
    """The adapter alone (LoRA weights + the trained head, safetensors), built aside and renamed into place."""
    from hpcnlp.runtime.io import atomic_dir, normal_mode

    with atomic_dir(path, replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.iterdir():
            normal_mode(f)  # safetensors writes 0600 whatever the umask
