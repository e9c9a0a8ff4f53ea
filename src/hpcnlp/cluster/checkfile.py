"""`hpcnlp check` on what is not a job config: a cluster profile (profile keys, no `job:`) is checked for
shape and problems and shown as each job's sbatch options; a pipeline (`stages:`) has every stage checked
and planned as `hpcnlp pipeline --dry-run` plans it, queueing nothing."""

from __future__ import annotations

import contextlib
import io
import sys

from hpcnlp.cluster.options import sbatch_options
from hpcnlp.cluster.pipeline import run_pipeline
from hpcnlp.cluster.profile import ClusterProfile, load_profile
from hpcnlp.config import ConfigError, read_yaml
from hpcnlp.jobs import registry


def kind(path: str) -> str | None:
    """'pipeline', 'profile', or None (a job config, or what load_config will say is wrong)."""
    try:
        raw = read_yaml(path)
    except ConfigError:
        return None
    if "job" in raw:
        return None
    if "stages" in raw:
        return "pipeline"
    return "profile" if set(raw) & set(ClusterProfile.model_fields) else None


def check_file(path: str, overrides: list[str]) -> int | None:
    """Exit code of `hpcnlp check` for a profile or a pipeline; None: a job config (the caller checks it)."""
    what = kind(path)
    if what is None:
        return None
    if overrides:
        print(f"error: {path}: key=value overrides apply to job configs, not to a {what}", file=sys.stderr)
        return 2
    if what == "profile":
        profile = load_profile(path)  # ConfigError: shape and problems, one line each
        print(f"ok: {path} is a valid cluster profile; per job:")
        for name, spec in registry().items():
            opts = [o for o in sbatch_options(profile, spec, name) if not o.startswith(("--job-name", "--output"))]
            print(f"  {name}: {' '.join(opts) or '(the batch header only)'}")
        return 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # every stage planned as the dry run does; its lines are not the point
        run_pipeline(path, dry_run=True)
    stages = [line.split(":")[0] for line in out.getvalue().splitlines() if line and not line.startswith(" ")]
    print(f"ok: {path} is a valid pipeline: {', '.join(stages)}")
    return 0
