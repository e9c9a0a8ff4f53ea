"""`hpcnlp prepare`: tokenize and pack a corpus into <prepared_root>/<fingerprint>/ (see data/pack.py)."""
from __future__ import annotations

from hpcnlp.config import PrepareConfig
from hpcnlp.data.pack import summary, prepare
from hpcnlp.models import load_tokenizer


def run(cfg: PrepareConfig) -> int:
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    result = prepare(cfg.data, tokenizer)
    print(f"{'reused' if result.reused else 'prepared'} {result.path}: {summary(result.stats)}")
    return 0
