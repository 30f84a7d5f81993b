"""Rebuild a run's evaluation report (eval/report.md, eval/report.html, eval/figures/) from its
artifacts alone: `python jobs/report.py --run-dir runs/default` (= `elrea-ray report runs/default`)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.cli import main as cli_main  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--run-dir",
        required=True,
        help="a run directory (or s3:// URI, pulled into its local mirror) whose eval stage has finished",
    )
    return cli_main(["report", ap.parse_args(argv).run_dir], prog="report.py")


if __name__ == "__main__":
    sys.exit(main())
