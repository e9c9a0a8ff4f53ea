"""Whether this install has the training stack (`pip install hpcnlp[train]`, make setup, the image).

A login node's thin install (`pip install hpcnlp`) checks, submits and follows jobs without torch and
transformers: the checks that need them (TrainingArguments, tokenizers, packaged models) are skipped
there, each said once in one line, and run when the job starts on its node.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

MODULES = ("torch", "transformers")


@functools.cache
def installed() -> bool:
    """torch and transformers importable (found, not imported: a check stays fast)."""
    return all(importlib.util.find_spec(m) is not None for m in MODULES)


@functools.cache
def skipped(what: str) -> None:
    """One line, once per check, saying that `what` waits for the job's start."""
    print(f"note: {what}: not checked here (no torch/transformers installed); checked at job start", file=sys.stderr)
