"""hpcnlp command line: `hpcnlp <command> --config jobs/<file>.yaml [dotted.key=value ...]`.

Every job command validates its config first (the same check `hpcnlp check` and the submit path
run) and refuses to start, writing nothing, when there is any problem.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# command -> (module with run(cfg) -> int, one-line help). A job's config has `job: <command>`.
JOBS: dict[str, tuple[str, str]] = {
    "prepare": ("hpcnlp.jobs.prepare", "tokenize and pack a corpus once (reused by later pretrain runs)"),
    "pretrain": ("hpcnlp.jobs.pretrain", "continued masked-LM pretraining; perplexity before/after"),
    "finetune": ("hpcnlp.jobs.finetune", "fine-tune for sequence classification or NER; scores, predictions"),
    "distill": ("hpcnlp.jobs.distill", "distill a fine-tuned teacher into a smaller student; retention, speed-up"),
    "export": ("hpcnlp.jobs.export", "export a model to ONNX with Optimum; optional ORT optimization, int8"),
    "validate": ("hpcnlp.jobs.validate", "gate ONNX vs PyTorch (parity, metric, latency); ship or reject a bundle"),
}

EXIT_CONFIG = 2  # the config was refused; nothing ran, nothing was written


def setup_logging() -> None:
    from hpcnlp.runtime.env import rank

    logging.basicConfig(level=os.environ.get("HPCNLP_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s [rank {rank()}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    # Library-internal warnings a user can do nothing about (transformers' token counter, pyarrow sort option).
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
    for noisy in ("datasets", "transformers.tokenization_utils_base", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # progress bars turn batch logs into noise
        import datasets

        datasets.disable_progress_bars()


def _config_parser(name: str, help_: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", "-c", required=True, help="job config YAML (see jobs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, dotted for sections: training.max_steps=100")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcnlp", description="Adapt transformer encoders on Slurm clusters and ship them as ONNX.",
        epilog="Each job reads a YAML config (jobs/*.yaml); `hpcnlp <command> --help` says more.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _config_parser("check", "validate a job config without running it (exit 2 on problems)", sub)
    for name, (_, help_) in JOBS.items():
        _config_parser(name, help_, sub)
    verify = sub.add_parser("verify", help="re-check a shipped bundle: checksums, ONNX loadability (exit 1 on problems)")
    verify.add_argument("bundle", help="bundle dir, e.g. artifacts/<name>/<version>")
    from hpcnlp import submit  # Slurm: submit, pipeline, sweep, summary

    submit.add_parsers(sub)
    return parser


def load_or_report(path: str, overrides: list[str], job: str | None):
    from hpcnlp.config import ConfigError, load_config

    try:
        return load_config(path, overrides, expect_job=job)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "verify":  # a bundle, not a job config
        from hpcnlp.bundle import verify_main

        return verify_main(args.bundle)
    from hpcnlp import submit

    if args.command in submit.COMMANDS:
        return submit.main(args)
    job = None if args.command == "check" else args.command
    cfg = load_or_report(args.config, args.overrides, job)
    if cfg is None:
        return EXIT_CONFIG
    if args.command == "check":
        print(f"ok: {args.config} is a valid '{cfg.job}' config")
        return 0
    code = run_job(cfg)
    if _left_process_group():  # not after an exception: the launcher stops the other ranks then
        # Skip the interpreter's teardown in distributed runs: on 2 nodes (torchrun and accelerate, gloo)
        # it sometimes aborted a rank after the job had finished ("terminate called without an active
        # exception", a C++ thread destroyed at exit), and the launcher then failed the whole job.
        # Everything is written by now (atomic writes); only the streams need flushing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_job(cfg) -> int:
    """Run a checked config's job; a ConfigError found only once it reads its data (a column, a label,
    a file's format) is reported like a refused config: one line per problem, exit 2, nothing written."""
    from hpcnlp.config import ConfigError

    try:
        return int(importlib.import_module(JOBS[cfg.job][0]).run(cfg) or 0)
    except ConfigError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG


def _left_process_group() -> bool:
    """Leave torch.distributed, all ranks together; False when this was not a distributed run."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        return False
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return True


if __name__ == "__main__":
    sys.exit(main())
