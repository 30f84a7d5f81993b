"""Run (or resume) the whole ELREA pipeline.

    python jobs/full_pipeline.py                                  # the embedded CPU demo
    python jobs/full_pipeline.py --config jobs/configs/smoke.yaml experts.lr=1e-4
    python jobs/full_pipeline.py --quiet                          # only errors and where the results are
    ray job submit --working-dir . -- python jobs/full_pipeline.py --config jobs/configs/paper.yaml

Attaches to a running Ray cluster (RAY_ADDRESS, `ray job submit`, or `ray start` on this machine)
and otherwise starts a local Ray in-process.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], prog="full_pipeline.py"))
