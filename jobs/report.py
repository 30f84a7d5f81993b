"""Rebuild a run's evaluation report (eval/report.md, eval/report.html, eval/figures/) from its
artifacts alone: `python jobs/report.py --run-dir runs/default`."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.artifacts import RunDir  # noqa: E402
from elrea_ray.report import write_report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True,
                    help="a run directory (or s3:// URI, pulled into its local mirror) whose eval stage has finished")
    args = ap.parse_args(argv)
    run = RunDir.at(args.run_dir)
    run.pull(log=lambda msg: None)  # no-op for a local run directory
    root = run.root
    if not (root / "eval" / "metrics.json").exists():
        print(f"error: {root / 'eval' / 'metrics.json'} is missing; run the pipeline's eval stage first",
              file=sys.stderr)
        return 2
    out = write_report(root)
    run.sync_up("eval")  # an s3:// run gets the new report too
    print(f"wrote {out['markdown']} and {out['html']} ({len(out['figures'])} figures)")
    for note in out["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
