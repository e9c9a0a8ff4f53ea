"""hpcnlp command line: `hpcnlp <command> --config jobs/<file>.yaml [dotted.key=value ...]`.

Every job command validates its config first (the same check `hpcnlp check` and the submit path
run) and refuses to start, writing nothing, when there is any problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from hpcnlp.checks import log_bf16_advice
from hpcnlp.cluster import COMMANDS
from hpcnlp.cluster.checkfile import check_file
from hpcnlp.cluster.plan import check_on_profile
from hpcnlp.config import ConfigError
from hpcnlp.jobs import JOBS, load_config, report, run_job
from hpcnlp.runtime.status import process_exit


def setup_logging() -> None:
    from hpcnlp.runtime.env import rank

    logging.basicConfig(
        level=os.environ.get("HPCNLP_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s [rank {rank()}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # Library-internal warnings a user can do nothing about (transformers' token counter, pyarrow sort option).
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
    for noisy in ("datasets", "transformers.tokenization_utils_base", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # progress bars turn batch logs into noise
        # The variable, not datasets.disable_progress_bars(): datasets reads it when a job imports it, and
        # check/submit/status import no training library (they run on login nodes without one).
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _config_parser(name: str, help_: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", "-c", required=True, help="job config YAML (see jobs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, dotted for sections: training.max_steps=100",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcnlp",
        description="Adapt transformer encoders on Slurm clusters and ship them as ONNX.",
        epilog="Each job reads a YAML config (jobs/*.yaml); `hpcnlp <command> --help` says more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _config_parser(
        "check", "validate a job config, a cluster profile or a pipeline without running it (exit 2 on problems)", sub
    )
    for spec in JOBS.values():
        _config_parser(spec.name, spec.help, sub)
    verify = sub.add_parser(
        "verify", help="re-check a shipped bundle: checksums, ONNX loadability (exit 1 on problems)"
    )
    verify.add_argument("bundle", help="bundle dir, e.g. artifacts/<name>/<version>")
    for command in COMMANDS.values():  # Slurm: submit, pipeline, sweep, status, summary
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "verify":  # a bundle, not a job config
        from hpcnlp.ship.bundle import verify_main

        return verify_main(args.bundle)
    if args.command in COMMANDS:
        return COMMANDS[args.command].main(args)
    try:
        if args.command == "check":  # a cluster profile or a pipeline YAML is checked as what it is
            code = check_file(args.config, args.overrides)
            if code is not None:
                return code
        cfg = load_config(args.config, args.overrides, expect_job=None if args.command == "check" else args.command)
    except ConfigError as e:
        return report(e)
    if args.command == "check":
        try:  # and one the cluster profile can run, with the same plan submit makes
            check_on_profile(cfg, JOBS[cfg.job], args.config)
        except ConfigError as e:
            return report(e)
        if JOBS[cfg.job].model_config:  # a training job: what training.bf16 comes to on this node
            log_bf16_advice(cfg, JOBS[cfg.job].model_config(cfg))
        print(f"ok: {args.config} is a valid '{cfg.job}' config")
        return 0
    code = process_exit(run_job(cfg))
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
