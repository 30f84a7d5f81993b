"""Ray Tune sweep over cluster count, expert lr, routing temperature / top-k (and optionally the
base lr), chosen on the validation split; stages 0-2 are built once and shared by the trials.

    python jobs/tune_sweep.py --config jobs/configs/smoke.yaml
    python jobs/tune_sweep.py --config jobs/configs/default.yaml sweep.initial_clusters=[3,5,8]
    python jobs/tune_sweep.py --from-run runs/default sweep.initial_clusters=[2,3,5,8]   # reuse a run
    python jobs/full_pipeline.py --config runs/sweep-smoke/best.yaml     # test split, chosen config

The search space is the config's `sweep` section (elrea_ray/config.py: SweepConfig). Writes
results.csv, results.md, objective_vs_clusters.png and best.yaml into sweep.dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]], prog="tune_sweep.py"))
