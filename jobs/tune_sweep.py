"""Ray Tune sweep over cluster count, expert lr, routing temperature / top-k (and optionally the
base lr), chosen on the validation split; stages 0-2 are built once and shared by the trials.

    python jobs/tune_sweep.py --config jobs/configs/smoke.yaml
    python jobs/tune_sweep.py --config jobs/configs/default.yaml sweep.initial_clusters=[3,5,8]
    python jobs/tune_sweep.py --from-run runs/default sweep.initial_clusters=[2,3,5,8]   # reuse a run
    python jobs/full_pipeline.py --config runs/sweep-smoke/best.yaml     # test split, chosen config

The search space is the config's `sweep` section (elrea_ray/config.py: SweepConfig). Writes
results.csv, results.md, objective_vs_clusters.png and best.yaml into sweep.dir.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.cli import connect_ray  # noqa: E402
from elrea_ray.config import load_config  # noqa: E402
from elrea_ray.sweep import run_sweep, seed_from_run  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT), help="YAML config (default: %(default)s)")
    ap.add_argument("--sweep-dir", help="shorthand for sweep.dir=DIR")
    ap.add_argument("--from-run", metavar="RUN_DIR",
                    help="reuse a finished pipeline run (local): trials whose settings match its stages "
                         "0-2 (and clusters/experts) start from copies (hard links) of them")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. sweep.temperature=[0.5,1]")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"sweep.dir={args.sweep_dir}"] if args.sweep_dir else [])
    cfg = load_config(args.config, overrides)
    if args.from_run:
        seed_from_run(cfg, args.from_run)
    connect_ray(cfg)
    out = run_sweep(cfg)
    print()
    print(Path(out["markdown"]).read_text())
    for k in ("csv", "markdown", "plot", "best"):
        print(f"  {k}: {out[k]}")


if __name__ == "__main__":
    main()
