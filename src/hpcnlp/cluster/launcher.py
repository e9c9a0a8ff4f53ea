"""slurm/launch.sh's planner: `python -m hpcnlp.cluster.launcher plan <job> --config ...`.

The job's spec says whether it runs as one process on its node (export, validate, prepare: N copies
would race on output_dir); the registry that holds it sits above hpcnlp.runtime, so the look-up is
here and hpcnlp.runtime.launch is given the answer.
"""

from __future__ import annotations

import sys

from hpcnlp.jobs import JOBS
from hpcnlp.runtime import launch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = JOBS.get(argv[1]) if argv[:1] == ["plan"] and len(argv) > 1 else None
    return launch.main(argv, single_process=bool(spec and spec.single_process))


if __name__ == "__main__":
    sys.exit(main())
