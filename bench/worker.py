"""`python -m bench.worker case.json result.json`: run one benchmark case in this fresh process."""

from __future__ import annotations

import importlib
import json
import logging
import sys


def main(spec: str, result: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    case = json.loads(open(spec).read())
    module, func = case.pop("run").rsplit(".", 1)
    if case.get("threads"):  # a threads lever: more intra-op threads than make bench's one
        import torch

        torch.set_num_threads(case.pop("threads"))
    out = getattr(importlib.import_module(module), func)(**case)
    with open(result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
