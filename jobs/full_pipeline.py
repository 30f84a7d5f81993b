"""Run (or resume) the whole ELREA pipeline.

    python jobs/full_pipeline.py                                  # the embedded CPU demo
    python jobs/full_pipeline.py --config jobs/configs/smoke.yaml experts.lr=1e-4
    ray job submit --working-dir . -- python jobs/full_pipeline.py --config jobs/configs/paper.yaml

Attaches to a running Ray cluster (RAY_ADDRESS, `ray job submit`, or `ray start` on this machine)
and otherwise starts a local Ray in-process.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.artifacts import RunDir  # noqa: E402
from elrea_ray.cli import connect_ray, print_results  # noqa: E402
from elrea_ray.config import load_config  # noqa: E402
from elrea_ray.pipeline import run_pipeline  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT), help="YAML config (default: %(default)s)")
    ap.add_argument("--run-dir", help="shorthand for run.run_dir=DIR")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. experts.lr=1e-4")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"run.run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    RunDir.at(cfg.run.run_dir, cfg.run.local_dir).check_unlocked()  # refuse a second run before starting Ray
    connect_ray(cfg)
    run = run_pipeline(cfg)
    print_results(run)


if __name__ == "__main__":
    main()
