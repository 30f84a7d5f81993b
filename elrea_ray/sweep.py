"""Ray Tune sweep over the later ELREA stages, reusing the expensive early ones.

Cluster count, expert learning rate and routing temperature / top-k are fixed by hand in the
paper (Li et al., ICLR 2025, §5: BIRCH target 5, lr 2e-5, T = 1, all experts). A sweep picks them
on the **validation** split; the test split is only evaluated afterwards, once, for the chosen
config (`jobs/full_pipeline.py --config <sweep>/best.yaml`).

Train V2 pattern (see shared notes, ray-2.60 §1.6): each Tune trial is a function that *drives*
the pipeline stages: it starts the Ray Train runs, Ray Data actor pools and the clustering task
itself, holding only `sweep.cpus_per_trial` (0.01) CPU.

Layout under `sweep.dir`; every level is a content-addressed `RunDir`, so trials that agree on a
level's settings share it, and a rerun of the sweep skips what is already built:

    upstream/<gradients key>/   data, adapters/base, gradients        stages 0-2, once per stage-1-2 setting
    experts/<experts key>/      clusters, adapters/experts (+ links)  stages 3-4, once per clustering/expert setting
    trials/<validation key>/    links to the above, bundle.json, validation/ (the objective)
                                -- a complete run directory: best.yaml points its run.run_dir here
    tune/                       Ray Tune's experiment folders
    results.csv, results.md, objective_vs_clusters.png, best.yaml

Links are relative symlinks, so the sweep folder can move or be mounted elsewhere. Several trials
reaching the same level at once serialise on a blocking `flock` of `<level>/build.lock`: the first
builds, the others wait and then find the stage complete (and skip it). The run directory's own
`run.lock` refuses a second writer instead of waiting, which suits one pipeline per run dir but not
trials that are meant to queue up for a shared stage.

Not done: early stopping. A trial reports its objective once, at the end (the objective needs the
experts trained and the validation split decoded), so ASHA would have nothing to compare early.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from elrea_ray.artifacts import ArtifactError, RunDir, stage_key
from elrea_ray.bundle import write_bundle
from elrea_ray.config import Config, ConfigError, from_dict, merge
from elrea_ray.pipeline import stage_keys
from elrea_ray.stages import base as base_stage
from elrea_ray.stages import clusters as clusters_stage
from elrea_ray.stages import data as data_stage
from elrea_ray.stages import experts as experts_stage
from elrea_ray.stages import gradients as gradients_stage
from elrea_ray.stages.common import StageContext, routing_slice
from elrea_ray.stages.evaluate import decode_split, routing_weights
from elrea_ray.stages.gradients import read_features

# sweep field -> the config key it sets
PARAMS = {
    "initial_clusters": "clustering.initial_clusters",
    "experts_lr": "experts.lr",
    "train_lr": "train.lr",
    "temperature": "routing.temperature",
    "top_k": "routing.top_k",
}
UPSTREAM = ("data", "base", "gradients")
EXPERTS = ("clusters", "experts")


# -- the search space -------------------------------------------------------------------------------


def swept(cfg: Config) -> dict[str, tuple]:
    """{config key: values} for every sweep list that is not empty."""
    return {key: tuple(getattr(cfg.sweep, f)) for f, key in PARAMS.items() if getattr(cfg.sweep, f)}


def with_params(base: dict, params: dict[str, Any]) -> Config:
    """The base config (a plain dict) with `{"section.key": value}` applied, validated."""
    extra: dict = {}
    for path, value in params.items():
        section, key = path.split(".", 1)
        extra.setdefault(section, {})[key] = value
    return from_dict(merge(base, extra))


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """Every combination of the swept values (one empty point when nothing is swept)."""
    space = swept(cfg)
    return [dict(zip(space, combo)) for combo in itertools.product(*space.values())]


def param_space(cfg: Config) -> dict:
    from ray import tune

    make = tune.grid_search if cfg.sweep.search == "grid" else tune.choice
    return {k: make(list(v)) for k, v in swept(cfg).items()}


def check_space(cfg: Config) -> None:
    """Build every trial's config before anything starts, so a bad combination fails at once."""
    if not swept(cfg):
        raise ConfigError(
            "sweep: nothing to search; give at least one of sweep." + ", sweep.".join(PARAMS) + " a list of values"
        )
    base = cfg.to_dict()
    for point in grid_points(cfg):  # random search draws from the same values
        try:
            with_params(base, point)
        except ConfigError as e:
            raise ConfigError(f"sweep point {point}: {e}") from None
    if cfg.data.kind == "files" and not cfg.data.validation_files:
        raise ConfigError(
            "sweep: the objective is validation accuracy, but data.validation_files is "
            "empty; give a validation file (the test split is never used to choose)"
        )


def trial_demand(cfg: Config) -> dict[str, float]:
    """Peak CPUs / GPUs one trial holds at once: the largest of its stages' requests (stages run
    one after another inside a trial; the expert stage runs `max_concurrent` trainers together;
    the gradient stage's read and write tasks need one CPU beside its actors)."""
    t, g, e, ev = cfg.train, cfg.gradients, cfg.experts, cfg.eval
    cpu = max(
        t.num_workers * t.cpus_per_worker,
        g.num_actors * g.cpus_per_actor + 1.0,
        1.0,
        e.max_concurrent * e.num_workers * e.cpus_per_worker,
        ev.num_actors * ev.cpus_per_actor,
    )
    gpu = max(
        t.num_workers * t.use_gpu,
        g.num_actors * g.use_gpu,
        e.max_concurrent * e.num_workers * e.use_gpu * e.gpus_per_worker,
        ev.num_actors * ev.use_gpu,
    )
    return {"CPU": cpu, "GPU": float(gpu)}


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit side by side; more would start trial actors that only wait (notes §1.6).
    Fails at once, naming the resource, when not even one trial fits (Ray would wait forever)."""
    need = trial_demand(cfg)
    fits = []
    for res, amount in need.items():
        if amount <= 0:
            continue
        have = resources.get(res, 0.0)
        if have < amount:
            raise RuntimeError(
                f"sweep: one trial needs {amount:g} {res} at its peak (the largest of "
                f"train / gradients / experts.max_concurrent x workers / eval) but the "
                f"Ray cluster has {have:g} {res}; lower those settings or add nodes"
            )
        fits.append(int(have // amount))
    n = min(fits)
    if cfg.sweep.max_concurrent_trials is not None:
        n = min(n, cfg.sweep.max_concurrent_trials)
    return max(1, n)


# -- one trial --------------------------------------------------------------------------------------


@contextlib.contextmanager
def building(run: RunDir) -> Iterator[None]:
    """Exclusive use of one sweep level: wait (flock) for another trial building it, then take
    the run directory's own lock as a pipeline would."""
    run.root.mkdir(parents=True, exist_ok=True)
    with open(run.root / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            with run.lock():
                yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def link_stages(run: RunDir, source: RunDir, stages: tuple[str, ...]) -> None:
    """Make `run`'s stage folders relative symlinks to the real folders behind `source`'s."""
    for stage in stages:
        dst, target = run.stage_dir(stage), source.stage_dir(stage).resolve()
        if not target.exists():
            raise ArtifactError(f"sweep: stage {stage!r} output {target} is missing")
        if dst.is_symlink():
            if dst.resolve() == target:
                continue
            dst.unlink()
        elif dst.exists():
            raise ArtifactError(f"sweep: {dst} is a real folder; refusing to replace it with a link")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, dst.parent), dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # stage files are never modified after the stage completes
    except OSError:
        shutil.copy2(src, dst)


def _seed_stage(src: RunDir, dst: RunDir, stage: str, key: str) -> bool:
    """Put `src`'s finished `stage` (built with `key`) into `dst`, hard-linked where the filesystem
    allows; atomic (copied beside, then renamed). False when `dst` already holds it."""
    out = dst.stage_dir(stage)
    if dst.completed_key(stage) == key:
        return False
    tmp = out.with_name(out.name + ".seeding")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src.stage_dir(stage).resolve(), tmp, copy_function=_link_or_copy)
    if out.is_symlink():
        out.unlink()
    elif out.exists():  # incomplete or another key: not what this level's settings build
        shutil.rmtree(out)
    tmp.rename(out)
    entry = src.read_manifest().get("stages", {}).get(stage, {}) if src.manifest.exists() else {}
    dst.update_manifest(
        lambda m: m["stages"].__setitem__(
            stage, {**entry, "key": key, "status": "complete", "seeded_from": str(src.root)}
        )
    )
    return True


def seed_from_run(
    cfg: Config, source: str | Path, experts: bool = True, log: Callable[[str], None] = print
) -> list[str]:
    """Reuse a finished pipeline run: copy its stages 0-2 (and, with `experts`, its clusters and
    experts) into the sweep levels of every trial whose settings match them, so those trials skip
    straight to what they change. Files are hard-linked when the run is on the same filesystem.

    Returns the level folders seeded. A run none of whose stage 0-2 keys match a trial (it was
    built with other data, model, base-training or gradient settings) is an error naming the keys.
    """
    src = RunDir.at(Path(source).expanduser().resolve())
    if not src.root.is_dir():
        raise ArtifactError(f"sweep: --from-run {src.root} is not a folder")
    root = Path(cfg.sweep.dir).expanduser().resolve()
    base = cfg.to_dict()
    have = {s: src.completed_key(s) for s in UPSTREAM + EXPERTS}
    seeded: list[str] = []
    wanted: set[str] = set()
    matched = False
    for point in grid_points(cfg):
        keys = stage_keys(with_params(base, point))
        wanted.add(keys["gradients"])
        if any(have[s] != keys[s] for s in UPSTREAM):
            continue
        matched = True
        up = RunDir.at(root / "upstream" / keys["gradients"])
        with building(up):
            if any([_seed_stage(src, up, s, keys[s]) for s in UPSTREAM]):
                seeded.append(str(up.root))
        if not experts or any(have[s] != keys[s] for s in EXPERTS):
            continue
        ex = RunDir.at(root / "experts" / keys["experts"])
        with building(ex):
            link_stages(ex, up, UPSTREAM)
            if any([_seed_stage(src, ex, s, keys[s]) for s in EXPERTS]):
                seeded.append(str(ex.root))
    if not matched:
        missing = [s for s in UPSTREAM if have[s] is None]
        why = (
            f"its stages {', '.join(missing)} are not complete"
            if missing
            else f"its gradients stage has key {have['gradients']}, the sweep's trials need "
            + " or ".join(sorted(wanted))
            + " (other data, model, train or gradients settings)"
        )
        raise ArtifactError(f"sweep: --from-run {src.root} matches no trial: {why}")
    for level in seeded:
        log(f"sweep: seeded {level} from {src.root}")
    return seeded


def validation_key(cfg: Config, keys: dict[str, str]) -> str:
    ec = cfg.eval
    return stage_key(
        "validation",
        {
            "routing": routing_slice(cfg),
            "metric": cfg.sweep.metric,
            "max_new_tokens": ec.max_new_tokens,
            "batch_size": ec.batch_size,
        },
        [keys["experts"], keys["gradients"]],
    )


def build_validation(cfg: Config, run: RunDir, out: Path) -> dict:
    """Decode the validation split with the trial's routing and score `sweep.metric` (the same
    EvalMapper and routing weights as the test-split eval stage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.evaluate import accuracy_table

    rows = pq.read_table(run.data_file("validation")).to_pylist()
    if not rows:
        raise ArtifactError(
            f"sweep: the validation split {run.data_file('validation')} is empty; the "
            "objective needs it (data.validation_per_source or data.validation_files)"
        )
    _, _, feats = read_features(run.gradient_dir("validation"), order=[r["example_id"] for r in rows])
    weights = routing_weights(cfg, run, feats)
    method = cfg.sweep.metric
    bundle = json.loads(run.bundle.read_text())
    adapters = {n: run.ref(run.root / p) for n, p in bundle["adapters"].items()}
    preds = decode_split(
        cfg.eval, bundle["model"], adapters, rows, {method: weights[method]} if method in weights else {}, [method]
    )
    pq.write_table(pa.Table.from_pandas(preds, preserve_index=False), out / "predictions.parquet")
    table = accuracy_table(
        preds["source"].tolist(), {method: preds[f"score_{method}"].tolist()}, resamples=0, seed=cfg.run.seed
    )
    metrics = {
        "split": "validation",
        "metric": method,
        "accuracy": table[method]["micro"]["acc"],
        "n": table[method]["micro"]["n"],
        "ci": table[method]["micro"]["ci"],
        "per_source": table[method]["per_source"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"accuracy": metrics["accuracy"], "n": metrics["n"]}


def run_trial(cfg: Config, sweep_root: Path, log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the three levels for one trial config; return its row of the results."""
    t0 = time.time()
    keys = stage_keys(cfg)
    built: list[str] = []

    vkey = validation_key(cfg, keys)

    def stage(run: RunDir, name: str, fn) -> None:
        if run.run_stage(name, vkey if name == "validation" else keys[name], fn, log)[1]:
            built.append(name)

    up = RunDir.at(sweep_root / "upstream" / keys["gradients"])
    with building(up):
        in_up = StageContext(cfg, up, keys, log=log).at
        stage(up, "data", lambda out: data_stage.run(in_up(out)))
        stage(up, "base", lambda out: base_stage.run(in_up(out)))
        stage(up, "gradients", lambda out: gradients_stage.run(in_up(out)))
    ex = RunDir.at(sweep_root / "experts" / keys["experts"])
    with building(ex):
        link_stages(ex, up, UPSTREAM)
        in_ex = StageContext(cfg, ex, keys, log=log).at
        stage(ex, "clusters", lambda out: clusters_stage.run(in_ex(out)))
        stage(ex, "experts", lambda out: experts_stage.run(in_ex(out)))
    tr = RunDir.at(sweep_root / "trials" / vkey)
    with building(tr):
        link_stages(tr, ex, UPSTREAM + EXPERTS)
        trial_cfg = cfg.replace(run=dataclasses.replace(cfg.run, run_dir=str(tr.root), local_dir=None))
        (tr.root / "config.yaml").write_text(yaml.safe_dump(best_config_dict(trial_cfg), sort_keys=False))
        tr.update_manifest(lambda m: m.update({"config": trial_cfg.to_dict(), "keys": keys}))
        if not tr.bundle.exists() or json.loads(tr.bundle.read_text()).get("keys") != keys:
            write_bundle(cfg, tr, keys)
        stage(tr, "validation", lambda out: build_validation(cfg, tr, out))
    metrics = json.loads(tr.stage_dir("validation").joinpath("metrics.json").read_text())
    clusters = json.loads(tr.clusters_file("report.json").read_text())
    return {
        "objective": metrics["accuracy"],
        "validation_n": metrics["n"],
        "validation_ci_low": metrics["ci"][0],
        "validation_ci_high": metrics["ci"][1],
        "num_clusters": clusters["num_clusters"],
        "trial_dir": str(tr.root),
        "upstream_dir": str(up.root),
        "built": ",".join(built),
        "seconds": round(time.time() - t0, 1),
    }


def _trainable(params: dict, base: dict, root: str) -> None:
    """The Tune function: one trial drives its stages, then reports once."""
    import ray
    from ray import tune

    # Tune runs this function in the trial's placement group ({CPU: 0.01}) and captures every task
    # started from it into that group, where a 1-CPU task can never fit. The stages run in a 0-CPU
    # task outside the group instead, so their trainers, actor pools and tasks use the whole cluster.
    work = ray.remote(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)(run_trial)
    ref = work.remote(with_params(base, params), Path(root))
    try:
        tune.report(ray.get(ref))
    except BaseException:
        ray.cancel(ref, force=True)
        raise


# -- the sweep --------------------------------------------------------------------------------------


def best_config_dict(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("sweep")
    return d


def _absolute_files(cfg: Config) -> Config:
    """Tune runs each trial in its own working directory: make data file paths absolute first."""
    d = cfg.data
    fix = lambda fs: tuple(str(Path(f).expanduser().resolve()) for f in fs)  # noqa: E731
    archive = fix([d.bigbench_archive])[0] if d.bigbench_archive else ""
    return cfg.replace(
        data=dataclasses.replace(
            d,
            train_files=fix(d.train_files),
            validation_files=fix(d.validation_files),
            test_files=fix(d.test_files),
            bigbench_archive=archive,
        )
    )


def run_sweep(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Run the sweep on the connected Ray; write the table, plot and best.yaml. Returns paths and rows."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    check_space(cfg)
    cfg = _absolute_files(cfg)
    root = Path(cfg.sweep.dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    from elrea_ray.pipeline import check_stage_resources
    from elrea_ray.resources import cluster_offer
    from elrea_ray.tracking import tracker

    check_stage_resources(cfg)  # the pipeline's check: what no node (type) could ever hold fails now
    # On an autoscaling cluster the offer counts the nodes it may still add (trials then wait for them).
    conc = max_concurrent_trials(cfg, cluster_offer())
    n_trials = len(grid_points(cfg)) * cfg.sweep.num_samples if cfg.sweep.search == "grid" else cfg.sweep.num_samples
    conc = min(conc, max(1, n_trials))
    log(
        f"sweep: {n_trials} trials over {', '.join(swept(cfg))}, at most {conc} at once; "
        f"objective: validation accuracy of {cfg.sweep.metric}; folder {root}"
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=cfg.to_dict(), root=str(root)), {"cpu": cfg.sweep.cpus_per_trial}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            num_samples=cfg.sweep.num_samples,
            search_alg=BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=conc),
        ),
        # A fresh experiment name per invocation: the stages themselves are what a rerun reuses.
        run_config=tune.RunConfig(
            name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(root / "tune"),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=tracker(cfg, root).tune_callbacks(),
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"sweep: {len(grid.errors)} of {len(grid)} trials failed; first error:\n{grid.errors[0]}")
    rows = []
    for i, res in enumerate(grid):
        row = {"trial": i, **{k: res.config[k] for k in swept(cfg)}}
        row.update(
            {
                k: res.metrics[k]
                for k in (
                    "num_clusters",
                    "objective",
                    "validation_n",
                    "validation_ci_low",
                    "validation_ci_high",
                    "built",
                    "seconds",
                    "trial_dir",
                    "upstream_dir",
                )
            }
        )
        rows.append(row)
    # Best: highest validation accuracy; ties go to the earliest trial (stable sort).
    rows.sort(key=lambda r: -r["objective"])
    best = rows[0]
    best_cfg = with_params(cfg.to_dict(), {k: best[k] for k in swept(cfg)})
    best_cfg = best_cfg.replace(run=dataclasses.replace(best_cfg.run, run_dir=best["trial_dir"], local_dir=None))
    paths = write_outputs(cfg, root, rows, best_cfg)
    log(
        f"sweep: best validation accuracy {best['objective']:.3f} (n={best['validation_n']}) with "
        + ", ".join(f"{k}={best[k]}" for k in swept(cfg))
        + f"; best config {paths['best']}"
    )
    return {"rows": rows, "best": best, **paths}


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else ("all" if v is None else str(v))


def _results_markdown(cfg: Config, root: Path, rows: list[dict], params: list[str]) -> str:
    head = ["#", *params, "clusters", f"val acc ({cfg.sweep.metric})", "95% CI", "n", "built", "s"]
    lines = [
        f"# Sweep results (validation split; objective: {cfg.sweep.metric} accuracy)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        ci = f"[{r['validation_ci_low']:.2f}, {r['validation_ci_high']:.2f}]"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["trial"]),
                    *[_fmt(r[p]) for p in params],
                    str(r["num_clusters"]),
                    f"{r['objective']:.3f}",
                    ci,
                    str(r["validation_n"]),
                    r["built"] or "-",
                    f"{r['seconds']:.0f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "`built`: stages this trial computed; the others were reused from a trial with the same settings.",
        f"Best config: `{root / 'best.yaml'}` (run it with "
        "`python jobs/full_pipeline.py --config` to evaluate the test split once).",
    ]
    return "\n".join(lines) + "\n"


def _plot_objective(cfg: Config, rows: list[dict], params: list[str], png: Path) -> None:
    """Validation objective against the cluster count, one line per setting of the other swept
    parameters; the best trial (rows[0]) circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    others = [p for p in params if p != "clustering.initial_clusters"]
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[p] for p in others), []).append(r)
    for g, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["num_clusters"])
        label = ", ".join(f"{p.split('.')[-1]}={_fmt(v)}" for p, v in zip(others, g)) or None
        ax.plot([r["num_clusters"] for r in rs], [r["objective"] for r in rs], marker="o", label=label)
    b = rows[0]
    ax.scatter(
        [b["num_clusters"]], [b["objective"]], s=160, facecolors="none", edgecolors="red", zorder=5, label="best"
    )
    ax.set_xlabel(
        "number of clusters C (after balanced BIRCH)"
        if cfg.clustering.method == "balanced_birch"
        else "number of clusters C"
    )
    ax.set_ylabel(f"validation accuracy ({cfg.sweep.metric})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Sweep objective vs cluster count (n={b['validation_n']} validation examples)", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_outputs(cfg: Config, root: Path, rows: list[dict], best_cfg: Config) -> dict[str, str]:
    """The sweep's results.csv, results.md, objective_vs_clusters.png and best.yaml in `root`."""
    params = list(swept(cfg))
    cols = [
        "trial",
        *params,
        "num_clusters",
        "objective",
        "validation_n",
        "validation_ci_low",
        "validation_ci_high",
        "built",
        "seconds",
        "trial_dir",
    ]
    csv_path = root / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md_path = root / "results.md"
    md_path.write_text(_results_markdown(cfg, root, rows, params))
    png = root / "objective_vs_clusters.png"
    _plot_objective(cfg, rows, params, png)
    best_path = root / "best.yaml"
    best_path.write_text(
        "# Best sweep trial (highest validation accuracy). run.run_dir is that trial's\n"
        "# run directory, so `python jobs/full_pipeline.py --config` on this file reuses its\n"
        "# stages and evaluates the test split once.\n" + yaml.safe_dump(best_config_dict(best_cfg), sort_keys=False)
    )
    return {"csv": str(csv_path), "markdown": str(md_path), "plot": str(png), "best": str(best_path)}
