"""The `elrea-ray` command: run, sweep, report, serve, validate-config.

    elrea-ray run --config jobs/configs/smoke.yaml experts.lr=1e-4
    elrea-ray sweep --from-run runs/default sweep.initial_clusters=[2,3,5,8]
    elrea-ray report runs/default
    elrea-ray serve runs/default max_batch_size=16
    elrea-ray validate-config --config jobs/configs/paper.yaml train.num_workers=4

`jobs/full_pipeline.py`, `jobs/tune_sweep.py` and `jobs/report.py` (the `ray job submit`
entry points) call the same functions. Bad arguments and bad configs exit with status 2 and a
message that names what was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from elrea_ray.artifacts import RunDir
from elrea_ray.config import Config, ConfigError, load_config

# The embedded default, when the package runs from a checkout (an editable install).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.yaml"


def connect_ray(cfg: Config, worker_logs: bool = True, quiet: bool = False) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS or one started with `ray start` on this
    machine; otherwise start a local Ray in-process (with its dashboard: Train V2 clean-up needs it).
    worker_logs=False keeps the workers' output in Ray's session logs instead of streaming it
    here; quiet hides Ray's own INFO lines (e.g. where the dashboard is)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    kw = {"log_to_driver": worker_logs, "logging_level": logging.WARNING if quiet else logging.INFO}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, **kw)
        return
    if address:
        ray.init(address=address, **kw)
        return
    try:
        ray.init(address="auto", **kw)
        return
    except (ConnectionError, RuntimeError):
        pass
    ray.init(num_cpus=cfg.ray.num_cpus, **kw)


def print_results(run: RunDir, table: bool = True) -> None:
    results = run.eval_file("results.md")
    if table and results.exists():
        print()
        print(results.read_text())
    print(f"run directory: {run.root}")
    print(f"  results: {results}")
    print(f"  bundle (for serving): {run.bundle}")


def config_sections() -> str:
    """Every config section and its fields, for --help (the dataclasses in elrea_ray/config.py
    document each field)."""
    lines = ["config sections (override any field as section.key=value; values parse as YAML):"]
    for section in dataclasses.fields(Config):
        names = ", ".join(f.name for f in dataclasses.fields(section.default_factory()))
        lines.append(f"  {section.name}: {names}")
    return "\n".join(lines)


def _config_args(p: argparse.ArgumentParser, shorthand: tuple[str, str] | None = None) -> None:
    """--config, the overrides and, e.g. ("--run-dir", "run.run_dir"), a shorthand flag for one key."""
    default = str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None
    p.add_argument("--config", default=default, help="YAML config (default: %(default)s; none: the paper's settings)")
    if shorthand:
        p.add_argument(shorthand[0], dest="shorthand", metavar="DIR", help=f"shorthand for {shorthand[1]}=DIR")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. experts.lr=1e-4")


def _load(args, shorthand: str | None = None) -> Config:
    overrides = list(args.overrides)
    if shorthand and args.shorthand:
        overrides.append(f"{shorthand}={args.shorthand}")
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from elrea_ray.pipeline import run_pipeline
    from elrea_ray.progress import Progress, quiet_ray

    cfg = _load(args, "run.run_dir")
    RunDir.at(cfg.run.run_dir, cfg.run.local_dir).check_unlocked()  # refuse a second run before starting Ray
    # Our progress lines replace Ray's per-event output (worker lines, Ray Data's bars, Train's
    # reports), which stays in Ray's session logs unless --ray-logs asks for it here.
    connect_ray(cfg, worker_logs=args.ray_logs, quiet=args.quiet)
    if not args.ray_logs:
        quiet_ray(args.quiet)
    if not args.quiet and not args.ray_logs:
        print(
            "Ray's own worker output goes to its session logs (`ray logs`, the dashboard); --ray-logs streams it here"
        )
    log = (lambda line: None) if args.quiet else print  # errors still reach stderr (they are exceptions)
    if cfg.eval.seeds:  # one whole run per seed, then the pooled table
        from elrea_ray.seeds import run_seeds

        pooled = run_seeds(cfg, log=log)
        if not args.quiet:
            print()
            print(pooled.read_text())
        print(f"pooled results: {pooled}")
        return 0
    run = run_pipeline(cfg, log=log, progress=Progress.off() if args.quiet else None)
    print_results(run, table=not args.quiet)
    return 0


def cmd_sweep(args) -> int:
    from elrea_ray.sweep import run_sweep, seed_from_run

    cfg = _load(args, "sweep.dir")
    if args.from_run:
        seed_from_run(cfg, args.from_run)
    connect_ray(cfg)
    out = run_sweep(cfg)
    print()
    print(Path(out["markdown"]).read_text())
    for k in ("csv", "markdown", "plot", "best"):
        print(f"  {k}: {out[k]}")
    return 0


def cmd_report(args) -> int:
    from elrea_ray.report import write_report

    run = RunDir.at(args.run_dir)
    run.pull(log=lambda msg: None)  # no-op for a local run directory
    metrics = run.root / "eval" / "metrics.json"
    if not metrics.exists():
        raise CommandError(f"{metrics} is missing; run the pipeline's eval stage first")
    out = write_report(run)
    run.sync_up("eval")  # an s3:// run gets the new report too
    print(f"wrote {out['markdown']} and {out['html']} ({len(out['figures'])} figures)")
    for note in out["notes"]:
        print(f"note: {note}")
    return 0


def cmd_export(args) -> int:
    from elrea_ray.bundle import BundleError
    from elrea_ray.export import ExportError, export_run, push_to_hub
    from elrea_ray.markers import ArtifactError

    try:  # an s3:// run: load_bundle pulls what the bundle lists into the local mirror
        out = export_run(args.run_dir, args.out, args.format, args.base_model)
    except (ExportError, BundleError, ArtifactError) as e:
        raise CommandError(str(e)) from None
    print(f"wrote {args.format} adapters to {out} (see {out / 'README.md'})")
    if args.push_to_hub:
        try:
            print(f"pushed to {push_to_hub(out, args.push_to_hub)}")
        except ExportError as e:
            raise CommandError(str(e)) from None
    return 0


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from serve_apps.elrea_app import AppArgs, build_app

    app_args: dict = {"run_dir": args.run_dir}
    for item in args.app_args:
        key, sep, value = item.partition("=")
        if key == "api_key":
            from serve_apps.elrea_app import API_KEY_MOVED

            raise CommandError(API_KEY_MOVED)
        if not sep or key not in AppArgs.model_fields or key == "run_dir":
            raise CommandError(
                f"app argument {item!r} must be key=value with key one of "
                f"{sorted(set(AppArgs.model_fields) - {'run_dir'})}"
            )
        app_args[key] = value
    from elrea_ray import storage

    if not storage.is_remote(args.run_dir) and not (Path(args.run_dir) / "bundle.json").is_file():
        raise CommandError(f"{args.run_dir} has no bundle.json; run the pipeline there first")
    application = build_app(app_args)  # validates the app arguments before Ray starts
    if not ray.is_initialized():
        ray.init(address=args.address) if args.address else ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving {args.run_dir} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    serve.run(application, name="elrea", route_prefix="/", blocking=True)
    return 0


def cmd_validate_config(args) -> int:
    import yaml

    from elrea_ray.pipeline import stage_keys

    cfg = _load(args)
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    print("# stage keys: " + ", ".join(f"{k}={v}" for k, v in stage_keys(cfg).items()))
    return 0


class CommandError(Exception):
    """A command cannot start; the message says why (exit status 2)."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="elrea-ray",
        description=__doc__.split("\n")[0],
        epilog=config_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kw = {"epilog": config_sections(), "formatter_class": argparse.RawDescriptionHelpFormatter}

    p = sub.add_parser("run", help="run (or resume) the whole pipeline", **kw)
    _config_args(p, ("--run-dir", "run.run_dir"))
    p.add_argument(
        "--quiet", action="store_true", help="print only errors and where the results are (no stage or progress lines)"
    )
    p.add_argument(
        "--ray-logs",
        action="store_true",
        help="also stream Ray's own output here (worker lines, Ray Data progress bars)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune sweep over clusters, learning rates, routing", **kw)
    _config_args(p, ("--sweep-dir", "sweep.dir"))
    p.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="reuse a finished local pipeline run: trials whose settings match its stages "
        "0-2 (and clusters/experts) start from hard-linked copies of them",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="rebuild a run's evaluation report from its artifacts")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or s3:// URI whose eval stage has finished")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve a run's routed ensemble as an OpenAI-compatible endpoint")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (local or s3://)")
    p.add_argument(
        "app_args",
        nargs="*",
        metavar="KEY=VALUE",
        help="app arguments of serve_apps.elrea_app.AppArgs, e.g. max_batch_size=16 api_key_file=...",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start`, or a new local Ray)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a run's adapters as plain PEFT folders or vLLM's multi-LoRA layout")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (local or s3://)")
    p.add_argument(
        "--format",
        choices=("peft", "vllm"),
        default="peft",
        help="peft: adapters/<name>/ + routing/ (centroids, epoch checkpoints, routing.json); "
        "vllm: <name>/ folders + lora_modules.json",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument(
        "--base-model",
        metavar="NAME",
        help="base_model_name_or_path written into the adapters (default: the run's backbone)",
    )
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face repo")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "validate-config", help="load and check a config; print the resolved values and stage keys", **kw
    )
    _config_args(p)
    p.set_defaults(func=cmd_validate_config)
    return top


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser()
    if prog:
        p.prog = prog
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CommandError) as e:
        print(f"{p.prog if prog else p.prog + ' ' + args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
