"""The ELREA pipeline as six content-addressed stages over one run directory.

    data -> base (Ray Train) -> gradients (Ray Data actors) -> clusters (Ray task)
         -> experts (concurrent Ray Train runs) + bundle.json -> eval (Ray Data actors)

Each stage is a function `(cfg, run, keys) -> info` that reads only what earlier stages wrote.
Its key hashes the config slice it depends on plus its inputs' keys, so a rerun skips finished
stages and a changed setting reruns exactly the stages downstream of it (see `artifacts.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from elrea_ray.artifacts import ArtifactError, RunDir, stage_key, write_json_atomic
from elrea_ray.config import Config, TrainConfig

BUNDLE_FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")


def _asdict(x) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(x)))


# Settings that decide where and how fast a stage runs but not what it computes; they stay out of
# the stage keys, so giving a stage more CPUs or actors does not invalidate finished work.
_EXECUTION_ONLY = {"cpus_per_worker", "cpus_per_actor", "num_actors", "max_concurrent", "logging_steps",
                   "checkpoint_every_steps", "max_failures", "gpus_per_worker"}


def _slice(x) -> dict:
    return {k: v for k, v in _asdict(x).items() if k not in _EXECUTION_ONLY}


def stage_keys(cfg: Config) -> dict[str, str]:
    """Every stage's key, from the config alone (so they are known before anything runs)."""
    k: dict[str, str] = {}
    seed = cfg.run.seed
    data = _asdict(cfg.data)
    if not data["benchmarks"]:  # added later; left out when unset so older runs keep their keys
        del data["benchmarks"]
    k["data"] = stage_key("data", {"data": data, "seed": seed}, [])
    model = _asdict(cfg.model)
    k["base"] = stage_key("base", {"model": model, "train": _slice(cfg.train), "seed": seed}, [k["data"]])
    k["gradients"] = stage_key("gradients", {"model": model, "gradients": _slice(cfg.gradients)},
                               [k["data"], k["base"]])
    k["clusters"] = stage_key("clusters", {"clustering": _slice(cfg.clustering), "seed": seed},
                              [k["gradients"]])
    k["experts"] = stage_key("experts", {"experts": _slice(cfg.experts), "train": _slice(cfg.train),
                                         "seed": seed}, [k["base"], k["clusters"]])
    evals_on = [k["experts"], k["gradients"]]
    trained = _trained_baselines(cfg)
    if trained:  # only then: runs without these baselines keep their keys
        k["baselines"] = stage_key("baselines", {"methods": trained, "experts": _slice(cfg.experts),
                                                 "train": _slice(cfg.train), "model": model,
                                                 "clustering": _slice(cfg.clustering), "seed": seed},
                                   [k["base"], k["clusters"]])
        evals_on.append(k["baselines"])
    k["eval"] = stage_key("eval", {"eval": _slice(cfg.eval), "routing": _slice(cfg.routing)}, evals_on)
    return k


def _trained_baselines(cfg: Config) -> list[str]:
    from elrea_ray.baselines import TRAINED_BASELINES

    return [m for m in TRAINED_BASELINES if m in cfg.eval.methods]


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "ray", "datasets", "scikit-learn", "pyarrow", "reasoning-gym"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# -- stage 0: data ---------------------------------------------------------------------------------

def build_data(cfg: Config, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.data import build_splits_with_report

    splits, report = build_splits_with_report(cfg.data, cfg.run.seed)
    for split in SPLITS:
        rows = splits.get(split, [])
        if rows:
            table = pa.Table.from_pylist(rows)
        else:
            table = pa.table({c: pa.array([], pa.string()) for c in
                              ("example_id", "source", "prompt", "response", "answer", "meta")})
        pq.write_table(table, out / f"{split}.parquet")
    (out / "counts.json").write_text(json.dumps(report, indent=2))
    return report


# -- stage 1: base adapter --------------------------------------------------------------------------

def check_lengths(cfg: Config, run: RunDir) -> dict:
    """Too-long rows per split (an error naming file and row unless data.bad_rows=skip)."""
    import pyarrow.parquet as pq

    from elrea_ray.data import too_long_rows
    from elrea_ray.model import load_tokenizer

    splits = {s: pq.read_table(run.data_file(s)).to_pylist() for s in SPLITS}
    return too_long_rows(load_tokenizer(cfg.model), splits, cfg.model.max_length, cfg.data.bad_rows)


def adapter_job(cfg: Config, run: RunDir, run_name: str, name: str, seed: int, tc: TrainConfig,
                members: list[str] | None, init: str | None, folder: Path, save_epochs: bool = False,
                gpus_per_worker: float = 1.0) -> dict:
    """The `fit_adapter` keyword arguments of one adapter (base, expert or baseline): loop config,
    recipe `tc` (its num_workers / cpus_per_worker / use_gpu are the scaling), resource check."""
    loop = {"name": name, "seed": seed, "model": _asdict(cfg.model), "train": _asdict(tc),
            "data_file": run.ref(run.data_file("train")), "example_ids": members, "init_adapter": init,
            "out_dir": run.ref(folder), "save_epochs": save_epochs}
    return {"run_name": run_name, "loop_cfg": loop, "tc": tc, "storage": run.ref(run.ray_storage),
            "num_workers": tc.num_workers, "cpus_per_worker": tc.cpus_per_worker, "use_gpu": tc.use_gpu,
            "gpus_per_worker": gpus_per_worker, "check": cfg.ray.check_resources,
            "wait_s": cfg.ray.resource_wait_s}


def build_base(cfg: Config, run: RunDir, keys: dict, out: Path) -> dict:
    from elrea_ray.train import fit_adapter

    too_long = check_lengths(cfg, run)  # before any trainer starts
    tc = cfg.train
    result = fit_adapter(**adapter_job(cfg, run, f"base-{keys['base']}", "base", cfg.run.seed, tc, None, None,
                                       out, save_epochs=True))
    run.sync_down(out)  # rank 0 wrote the epoch checkpoints into the remote partial
    for e in range(1, tc.epochs + 1):
        if not (out / f"epoch-{e}" / "adam_state.safetensors").exists():
            raise ArtifactError(f"base adapter: epoch {e} checkpoint missing in {out}")
    return {**result, "too_long": too_long}


# -- stage 2: gradient features ---------------------------------------------------------------------

def epoch_weights(cfg: Config, run: RunDir) -> list[float]:
    """DESIGN decision: weight epoch e by its mean learning rate (as LESS), since under linear
    decay the end-of-epoch rate of the last epoch is 0; 'equal' or an explicit list also work."""
    from elrea_ray.checkpoints import load_adam_state

    g = cfg.gradients
    if isinstance(g.epoch_weights, str):
        if g.epoch_weights == "equal":
            return [1.0] * cfg.train.epochs
        return [load_adam_state(run.base_epoch(e)).mean_lr for e in range(1, cfg.train.epochs + 1)]
    if len(g.epoch_weights) != cfg.train.epochs:
        raise ValueError(f"gradients.epoch_weights has {len(g.epoch_weights)} values but train.epochs "
                         f"is {cfg.train.epochs}")
    return list(g.epoch_weights)


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A long-lived actor that allocates activations of varying size per batch, from several
    threads (Ray Data's actor threads, torch's intra-op pool), can leave glibc holding freed
    memory in fragmented arenas. When each split was a single Ray Data block, trimming every
    `TRIM_EVERY` batches held the actor's heap at 598 MB at 50k examples instead of 1.6 GB
    (`benchmarks/gradient_scale.py`). Since the split streams in blocks, the heap is flat at
    ~408 MB with or without the trim (one run each); the trim is kept as cheap insurance.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
# Trimming after every batch cost 20% of the stage's speed at 50k examples (pages handed back are
# faulted in again); every 8th batch cost nothing measurable.
TRIM_EVERY = 8


# Rows per Ray Data block (= one actor task) in map batches: progress is visible per block and a lost
# actor redoes little.
BATCHES_PER_BLOCK = 2
SHARD_BYTES = 64 << 20


def shard_rows(d_proj: int, block_rows: int) -> int:
    """Rows per feature shard: whole blocks, about SHARD_BYTES of float32 features (2,048 rows at
    d_proj 8192), so a large split is neither one huge file nor thousands of tiny ones."""
    return max(1, SHARD_BYTES // (4 * d_proj) // block_rows) * block_rows


class FeatureMapper:
    """Ray Data callable: one model copy per actor; prompt rows in, unit-norm features out."""

    def __init__(self, model_cfg: dict, checkpoints: list[str], weights: list[float], kind: str,
                 d_proj: int, seed: int, batch_size: int, use_gpu: bool, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)  # features are bitwise reproducible per thread count

        from elrea_ray.config import ModelConfig
        from elrea_ray.gradients import FeatureExtractor
        from elrea_ray.model import load_tokenizer

        from elrea_ray.storage import localize

        self.mc = ModelConfig(**model_cfg)
        self.tok = load_tokenizer(self.mc)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        checkpoints = [str(localize(c)) for c in checkpoints]
        self.fx = FeatureExtractor(self.mc, checkpoints, weights, kind, d_proj, seed, device=device,
                                   batch_size=batch_size)
        self.calls = 0

    def __call__(self, batch):
        import pyarrow as pa

        ids = [instruction_ids(self.tok, p, self.mc.max_length) for p in batch.column("prompt").to_pylist()]
        feats = self.fx.features(ids).astype(np.float32)
        d = feats.shape[1]
        self.calls += 1
        if self.calls % TRIM_EVERY == 0:
            release_freed_memory()
        return pa.table({
            "example_id": batch.column("example_id"), "source": batch.column("source"),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d)})


def instruction_ids(tok, prompt_json: str, max_length: int) -> list[int]:
    """The chat-formatted instruction (generation prompt included), at most max_length tokens: a
    longer one loses its first tokens, so the assistant header that decoding continues stays."""
    from elrea_ray.data import render_prompt

    ids = render_prompt(tok, json.loads(prompt_json))
    return ids[-max_length:]


def build_gradients(cfg: Config, run: RunDir, out: Path) -> dict:
    import pyarrow.parquet as pq
    import ray

    from elrea_ray import storage

    g = cfg.gradients
    weights = epoch_weights(cfg, run)
    ckpts = [run.ref(run.base_epoch(e)) for e in range(1, cfg.train.epochs + 1)]
    # Bitwise-identical features need the same batching and intra-op thread count (float sums
    # are reduced in a different order otherwise); the manifest records both.
    threads = max(1, int(g.cpus_per_actor))
    map_batch = g.batch_size * 4
    block_rows = map_batch * BATCHES_PER_BLOCK
    info = {"epoch_weights": weights, "rows": {},
            "reproducibility": {"batch_size": g.batch_size, "map_batch_size": map_batch,
                                "block_rows": block_rows, "torch_threads": threads, "use_gpu": g.use_gpu}}
    for split in SPLITS:
        path = run.data_file(split)
        rows = pq.read_metadata(path).num_rows
        info["rows"][split] = rows
        dest = out / split
        if rows == 0 or dest.exists():
            continue  # nothing to do, or written in full before an interruption (renamed below)
        src, src_fs = storage.for_ray_data(run.ref(path))
        ds = ray.data.read_parquet(src, filesystem=src_fs).select_columns(["example_id", "source", "prompt"])
        # Ray 2.60 reads a Parquet file as ONE block (override_num_blocks is not applied to it), so
        # the whole split used to be one actor task: a second actor got no work, a lost actor
        # redid everything, and Ray Data held every output batch in the actor's heap until the
        # split ended (measured: every batch of 32 rows kept its 64 KB of features). Blocks of
        # `block_rows` rows, sliced as they stream, make each block its own task. Shards are in no
        # particular row order (even preserve_order=True let batches swap, measured); readers that
        # need one ask read_features for it.
        ds = ds.repartition(target_num_rows_per_block=block_rows, strict=True)
        feats = ds.map_batches(
            FeatureMapper, batch_format="pyarrow", batch_size=map_batch,
            fn_constructor_kwargs={"model_cfg": _asdict(cfg.model), "checkpoints": ckpts,
                                   "weights": weights, "kind": g.projector, "d_proj": g.d_proj,
                                   "seed": g.projector_seed, "batch_size": g.batch_size,
                                   "use_gpu": g.use_gpu, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=g.num_actors),
            num_cpus=g.cpus_per_actor, num_gpus=1 if g.use_gpu else 0)
        # Into a fresh folder renamed when complete: Ray's write_parquet appends, so shards left by
        # a killed run in the same folder would otherwise be counted twice.
        tmp = out / f"{split}.writing"
        if tmp.exists():
            shutil.rmtree(tmp)
        per_file = shard_rows(g.d_proj, block_rows)
        if run.remote is None:
            feats.write_parquet(str(tmp), min_rows_per_file=per_file)
        else:  # the actors' shards go to the object store; the driver pulls them into its partial
            storage.delete_dir(run.ref(tmp))
            dst, dst_fs = storage.for_ray_data(run.ref(tmp))
            feats.write_parquet(dst, filesystem=dst_fs, min_rows_per_file=per_file)
            storage.pull_dir(run.ref(tmp), tmp)
            storage.delete_dir(run.ref(tmp))  # no rename on S3: the pushed stage holds `dest`
        os.rename(tmp, dest)
    return info


def read_features(folder: Path, order: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(example ids, sources, features [N, d_proj]) of a split's shards, in shard order, or in
    `order` (example ids, e.g. the data file's) when given: every id of it must be there once."""
    import pyarrow.parquet as pq

    if not folder.exists():
        raise ArtifactError(f"missing gradient features {folder}")
    t = pq.read_table(folder)
    col = t.column("feature").combine_chunks()
    d = col.type.list_size
    X = col.flatten().to_numpy().reshape(-1, d).astype(np.float32)
    ids, sources = t.column("example_id").to_pylist(), t.column("source").to_pylist()
    if order is None:
        return ids, sources, X
    at = {e: i for i, e in enumerate(ids)}
    missing = [e for e in order if e not in at]
    if missing or len(at) != len(ids) or len(ids) != len(order):
        raise ArtifactError(f"gradient features {folder} do not match the data: {len(ids)} rows "
                            f"({len(ids) - len(at)} duplicated ids) for {len(order)} examples"
                            + (f"; missing e.g. {missing[0]}" if missing else ""))
    rows = [at[e] for e in order]
    return list(order), [sources[i] for i in rows], X[rows]


# -- stage 3: clusters ------------------------------------------------------------------------------

def _fit_remote(X: np.ndarray, cc: dict, seed: int):
    from elrea_ray.clustering import fit_clusters

    if cc["method"] == "kmeans":
        return fit_clusters(X, "kmeans", num_clusters=cc["initial_clusters"], seed=seed)
    return fit_clusters(X, "balanced_birch", initial_clusters=cc["initial_clusters"],
                        max_ratio=cc["max_ratio"], max_rounds=cc["max_rounds"],
                        min_cluster_size=cc["min_cluster_size"], threshold=cc["threshold"], seed=seed)


def build_clusters(cfg: Config, run: RunDir, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from safetensors.numpy import save_file

    from elrea_ray.cluster_stage import cluster_streamed
    from elrea_ray.clustering import cluster_source_report

    # In data-file order: the fit sample is drawn by position, whatever order the shards have. The
    # features stream shard by shard (the driver never holds the table); only the sample is fitted.
    data_ids = pq.read_table(run.data_file("train"), columns=["example_id"]).column("example_id").to_pylist()
    cc = cfg.clustering
    fit_task = ray.remote(num_cpus=1)(_fit_remote)
    res = cluster_streamed(run.gradient_dir("train"), data_ids, cc.fit_sample, cfg.run.seed,
                           fit=lambda Xs: ray.get(fit_task.remote(Xs, _asdict(cc), cfg.run.seed)))
    labels, C = res.labels, len(res.centroids)
    save_file({"centroids": res.centroids}, str(out / "centroids.safetensors"))
    pq.write_table(pa.table({"example_id": res.ids, "source": res.sources, "cluster": labels}),
                   out / "assignments.parquet")
    report = {"num_clusters": C, "sizes": np.bincount(labels, minlength=C).tolist(),
              "rounds": res.fit.rounds, "threshold": res.fit.threshold, "fit_sample": res.fit_sample,
              "method": cc.method}
    report.update(cluster_source_report(labels, res.sources))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return {k: report[k] for k in ("num_clusters", "sizes", "nmi", "ari", "purity") if k in report}


# -- stage 4: experts and the bundle ----------------------------------------------------------------

def build_experts(cfg: Config, run: RunDir, keys: dict, out: Path) -> dict:
    import pyarrow.parquet as pq

    from elrea_ray.train import fit_many

    assignments = pq.read_table(run.clusters_file("assignments.parquet")).to_pylist()
    C = max(r["cluster"] for r in assignments) + 1
    ec = cfg.experts
    # Experts reuse the base recipe (batch, Adam, schedule) with their own lr and epochs.
    tc = dataclasses.replace(cfg.train, lr=ec.lr, epochs=ec.epochs, num_workers=ec.num_workers,
                             cpus_per_worker=ec.cpus_per_worker, use_gpu=ec.use_gpu)
    jobs = []
    for c in range(C):
        folder = out / f"expert-{c:02d}"
        if (folder / "adapter_config.json").exists():
            continue  # finished before an interruption
        members = [r["example_id"] for r in assignments if r["cluster"] == c]
        jobs.append(adapter_job(cfg, run, f"expert-{keys['experts']}-{c:02d}", f"expert-{c:02d}",
                                cfg.run.seed + 1 + c, tc, members, run.ref(run.base_epoch(cfg.train.epochs)),
                                folder, gpus_per_worker=ec.gpus_per_worker))
    results = fit_many(jobs, ec.max_concurrent)
    run.sync_down(out)  # each expert's rank 0 wrote its adapter into the remote partial
    return {"num_experts": C, "trained_now": len(jobs),
            "final_loss": [r.get("final_loss") for r in results]}


def write_bundle(cfg: Config, run: RunDir, keys: dict) -> dict:
    """bundle.json: everything serving needs, paths relative to the run directory."""
    from elrea_ray.projection import ProjectorSpec

    report = json.loads(run.clusters_file("report.json").read_text())
    C = report["num_clusters"]
    layout = json.loads((run.base_epoch(1) / "parameter_layout.json").read_text())
    d_in = sum(int(np.prod(s)) for _, s in layout)
    rel = lambda p: str(Path(p).relative_to(run.root))  # noqa: E731
    bundle = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": _asdict(cfg.model),
        "adapters": {"base": rel(run.base_epoch(cfg.train.epochs)),
                     **{f"expert-{c:02d}": rel(run.expert(c)) for c in range(C)}},
        "epoch_checkpoints": [rel(run.base_epoch(e)) for e in range(1, cfg.train.epochs + 1)],
        "epoch_weights": epoch_weights(cfg, run),
        "projector": ProjectorSpec(kind=cfg.gradients.projector, d_in=d_in, d_proj=cfg.gradients.d_proj,
                                   seed=cfg.gradients.projector_seed).to_dict(),
        "parameter_layout": layout,
        "centroids": rel(run.clusters_file("centroids.safetensors")),
        "num_clusters": C,
        "routing": _asdict(cfg.routing),
        "keys": keys,
    }
    write_json_atomic(run.bundle, bundle)
    run.publish(run.bundle)
    return bundle


# -- stage 4b: baselines that train adapters of their own (behind eval.methods) ---------------------

def build_baselines(cfg: Config, run: RunDir, keys: dict, out: Path) -> dict:
    """Adapters for Random Cluster, M+Q_dataset and Instruction Embedding (paper §5.3), trained
    concurrently like the experts; `baselines.json` lists them for the eval stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from elrea_ray.baselines import embed_instructions, instruction_text, random_partition
    from elrea_ray.clustering import assign, cluster_source_report, normalized_centroids
    from elrea_ray.train import fit_many

    trained = _trained_baselines(cfg)
    a = pq.read_table(run.clusters_file("assignments.parquet")).to_pylist()
    ids, sources = [r["example_id"] for r in a], [r["source"] for r in a]
    sizes = np.bincount([r["cluster"] for r in a]).tolist()
    ec = cfg.experts
    tc_expert = dataclasses.replace(cfg.train, lr=ec.lr, epochs=ec.epochs, num_workers=ec.num_workers,
                                    cpus_per_worker=ec.cpus_per_worker, use_gpu=ec.use_gpu)
    tc_base = dataclasses.replace(cfg.train, num_workers=ec.num_workers, cpus_per_worker=ec.cpus_per_worker,
                                  use_gpu=ec.use_gpu)
    info: dict = {"adapters": {}, "groups": {}}
    jobs = []

    def job(name: str, members: list[str], tc, init: str | None, seed: int):
        folder = out / name
        info["adapters"][name] = str(folder.relative_to(out))
        if (folder / "adapter_config.json").exists():
            return  # finished before an interruption
        jobs.append(adapter_job(cfg, run, f"baseline-{keys['baselines']}-{name}", name, seed, tc, members,
                                init, folder, gpus_per_worker=ec.gpus_per_worker))

    final_base = run.ref(run.base_epoch(cfg.train.epochs))
    if "random_clusters" in trained:  # same sizes, random members, warm start from Q_base
        labels = random_partition(sizes, cfg.run.seed + 7919)
        info["groups"]["random_clusters"] = []
        for c in range(len(sizes)):
            name = f"random-{c:02d}"
            job(name, [i for i, lab in zip(ids, labels) if lab == c], tc_expert, final_base, cfg.run.seed + 101 + c)
            info["groups"]["random_clusters"].append(name)
    if "dataset" in trained:  # one adapter per source, from scratch with the base recipe
        info["groups"]["dataset"] = {}
        for k, src in enumerate(sorted(set(sources))):
            name = f"dataset-{k:02d}"
            job(name, [i for i, s in zip(ids, sources) if s == src], tc_base, None, cfg.run.seed)
            info["groups"]["dataset"][src] = name
    if "embedding" in trained:  # sentence embeddings replace the gradients for clustering and routing
        emb = {}
        for split in ("train", "test"):
            t = pq.read_table(run.data_file(split), columns=["example_id", "source", "prompt"]).to_pylist()
            X = embed_instructions([instruction_text(r["prompt"]) for r in t])
            emb[split] = ([r["example_id"] for r in t], [r["source"] for r in t], X)
            pq.write_table(pa.table({"example_id": emb[split][0], "source": emb[split][1],
                                     "feature": pa.FixedSizeListArray.from_arrays(
                                         pa.array(X.reshape(-1)), X.shape[1])}),
                           out / f"embedding_{split}.parquet")
        tr_ids, tr_src, X = emb["train"]
        rng = np.random.default_rng(cfg.run.seed)
        sample = np.sort(rng.choice(len(X), size=min(cfg.clustering.fit_sample, len(X)), replace=False))
        fit = _fit_remote(X[sample], _asdict(cfg.clustering), cfg.run.seed)
        lab = assign(X, fit.centroids)
        used = sorted(set(lab.tolist()))
        lab = np.array([used.index(c) for c in lab.tolist()])
        save_file({"centroids": normalized_centroids(X, lab, len(used)).astype(np.float32)},
                  str(out / "embedding_centroids.safetensors"))
        rep = cluster_source_report(lab, tr_src)
        info["embedding_clusters"] = {"num_clusters": len(used), "sizes": np.bincount(lab).tolist(),
                                      **{k: rep[k] for k in ("nmi", "ari", "purity")}}
        info["groups"]["embedding"] = []
        for c in range(len(used)):
            name = f"embedding-{c:02d}"
            job(name, [i for i, lab_i in zip(tr_ids, lab) if lab_i == c], tc_expert, final_base,
                cfg.run.seed + 201 + c)
            info["groups"]["embedding"].append(name)
    results = fit_many(jobs, ec.max_concurrent) if jobs else []
    run.sync_down(out)
    info["trained_now"] = len(jobs)
    info["final_loss"] = [r.get("final_loss") for r in results]
    (out / "baselines.json").write_text(json.dumps(info, indent=2))
    return {k: info[k] for k in ("groups", "trained_now") if k in info} | (
        {"embedding_clusters": info["embedding_clusters"]} if "embedding_clusters" in info else {})


def _baseline_weights(cfg: Config, run: RunDir, test: list[dict], info: dict) -> dict[str, dict]:
    """{method: {"names": adapters, "w": [N, len(names)]}} of the trained baselines."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from elrea_ray.routing import route

    out = {}
    groups = info["groups"]
    N = len(test)
    if "random_clusters" in groups:  # all weights 1, base included (paper's Random Cluster)
        names = ["base", *groups["random_clusters"]]
        out["random_clusters"] = {"names": names, "w": np.ones((N, len(names)))}
    if "dataset" in groups:  # each item decoded by its own source's adapter (base if none)
        names = ["base", *groups["dataset"].values()]
        w = np.zeros((N, len(names)))
        for i, r in enumerate(test):
            name = groups["dataset"].get(r["source"])
            w[i, names.index(name) if name else 0] = 1.0
        out["dataset"] = {"names": names, "w": w}
    if "embedding" in groups:
        t = pq.read_table(run.stage_dir("baselines") / "embedding_test.parquet")
        order = {e: i for i, e in enumerate(t.column("example_id").to_pylist())}
        col = t.column("feature").combine_chunks()
        X = col.flatten().to_numpy().reshape(-1, col.type.list_size)[[order[r["example_id"]] for r in test]]
        cents = load_file(str(run.stage_dir("baselines") / "embedding_centroids.safetensors"))["centroids"]
        ew, bw = route(X, cents, temperature=cfg.routing.temperature)
        out["embedding"] = {"names": ["base", *groups["embedding"]],
                            "w": np.concatenate([bw[:, None], ew], axis=1)}
    return out


# -- stage 5: evaluation ----------------------------------------------------------------------------

def _share_groups(sets: dict[str, np.ndarray]) -> list[tuple[list[int], list[str]]]:
    """Methods whose adapter sets nest (column 0, the bare backbone, is free) share one decoding
    call; others get their own, so that no row pays for the rank blocks of adapters its group
    never uses (a stacked row computes every adapter of its call; see elrea_ray.stacked).
    Returns (columns of the call: 0 and the group's adapters, the group's methods) per call."""
    groups: list[tuple[set[int], list[str]]] = []
    for m, w in sets.items():
        used = {int(a) for a in np.flatnonzero(w.any(0)) if a}
        for g in groups:
            if used <= g[0] or g[0] <= used:
                g[0].update(used)
                g[1].append(m)
                break
        else:
            groups.append((used, [m]))
    return [([0, *sorted(used)], methods) for used, methods in groups]


class EvalMapper:
    """Ray Data callable: the backbone with all C+1 adapters loaded once per actor; decodes every
    method for a batch of test prompts (ensembles as ONE batched forward with a KV cache)."""

    def __init__(self, model_cfg: dict, adapters: dict[str, str], methods: list[str], max_new_tokens: int,
                 use_gpu: bool):
        import torch

        from elrea_ray.config import ModelConfig
        from elrea_ray.model import load_adapters, load_tokenizer
        from elrea_ray.storage import localize

        self.mc = ModelConfig(**model_cfg)
        self.tok = load_tokenizer(self.mc)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        adapters = {n: str(localize(p)) for n, p in adapters.items()}
        self.model = load_adapters(self.mc, adapters, device)
        self.names = list(adapters)  # "base", "expert-00", ...
        self.methods = methods
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        from elrea_ray.data import score, stop_ids
        from elrea_ray.ensemble import ensemble_generate_many
        from elrea_ray.stacked import BACKBONE

        prompts = [instruction_ids(self.tok, p, self.mc.max_length) for p in batch["prompt"]]
        eos, pad = stop_ids(self.tok), self.tok.pad_token_id
        out = {"example_id": batch["example_id"], "source": batch["source"]}
        rows = [{"answer": a, "meta": m, "source": s} for a, m, s in
                zip(batch["answer"], batch["meta"], batch["source"])]
        # Every method but MoE merging decodes in ONE call over [backbone, adapters...]: the
        # methods share each (prompt, adapter) prefill (ensemble_generate_many).
        names = [BACKBONE, *self.names]
        sets = {}
        for method in self.methods:
            if method == "moe_merge":
                continue
            w = np.zeros((len(prompts), len(names)))
            if method in ("backbone", "base"):
                w[:, names.index(BACKBONE if method == "backbone" else "base")] = 1.0
            else:
                w[:, 1:] = np.stack([np.asarray(x, dtype=np.float64) for x in batch[f"w_{method}"]])
            sets[method] = w
        gens = {}
        for cols, group in _share_groups(sets):  # methods over nested adapter sets decode together
            gens.update(ensemble_generate_many(self.model, prompts, [names[a] for a in cols],
                                               {m: sets[m][:, cols] for m in group},
                                               self.max_new_tokens, eos, pad))
        for method in self.methods:
            if method == "moe_merge":
                gen = self._merged_generate(prompts, batch["w_moe_merge"], eos, pad)
            else:
                gen = gens[method]
            text = [self.tok.decode(g, skip_special_tokens=True) for g in gen]
            out[f"pred_{method}"] = np.array(text, dtype=object)
            out[f"score_{method}"] = np.array([score(r, t) for r, t in zip(rows, text)], dtype=np.float64)
        return out

    def _merged_generate(self, prompts, weights, eos, pad):
        """MoE Merging: per prompt, one adapter averaged with its normalised routing weights."""
        from elrea_ray.ensemble import single_generate
        from elrea_ray.merging import drop_adapter, merge_adapters, normalized_alphas

        gen = []
        for p, w in zip(prompts, weights):
            alphas = normalized_alphas(np.asarray(w, dtype=np.float64))
            name = merge_adapters(self.model, self.names, alphas.tolist(), "__merged__")
            gen.extend(single_generate(self.model, [p], name, self.max_new_tokens, eos, pad))
            drop_adapter(self.model, name)
        return gen


def routing_weights(cfg: Config, run: RunDir, features: np.ndarray,
                    methods: tuple[str, ...] = ("elrea", "uniform", "top1")) -> dict[str, np.ndarray]:
    """[N, 1 + C] weight matrices (column 0 = base adapter) for every weighted method asked for:
    elrea (routing.top_k as configured), uniform, top<k> (k capped at C: top-all is ELREA) and
    moe_merge (the ELREA weights, merged into one adapter per prompt)."""
    from safetensors.numpy import load_file

    from elrea_ray.config import top_k_of
    from elrea_ray.routing import route, uniform_weights

    centroids = load_file(str(run.clusters_file("centroids.safetensors")))["centroids"]
    N, C = len(features), centroids.shape[0]
    rc = cfg.routing
    out = {}
    ew, bw = route(features, centroids, temperature=rc.temperature, top_k=rc.top_k, min_weight=rc.min_weight)
    out["elrea"] = np.concatenate([bw[:, None], ew], axis=1)
    for m in methods:
        k = top_k_of(m)
        if k is not None:
            ek, bk = route(features, centroids, temperature=rc.temperature, top_k=min(k, C))
            out[m] = np.concatenate([bk[:, None], ek], axis=1)
    if "uniform" in methods:
        uw, ub = uniform_weights(N, C)
        out["uniform"] = np.concatenate([ub[:, None], uw], axis=1)
    if "moe_merge" in methods:
        out["moe_merge"] = out["elrea"]
    return out


def decode_split(ec, model_cfg: dict, adapters: dict[str, str], rows: list[dict],
                 weights: dict[str, np.ndarray], methods: list[str]):
    """Decode and score `methods` on data rows over an EvalMapper actor pool (evaluation on the
    test split, sweep trials on the validation split). weights: [len(rows), n] per weighted
    method over `adapters` in order (column 0 = base). Returns the predictions DataFrame in row
    order: example_id, source, pred_<method>, score_<method>."""
    import ray

    items = []
    for i, r in enumerate(rows):
        item = {k: r[k] for k in ("example_id", "source", "prompt", "answer", "meta")}
        for m, w in weights.items():
            item[f"w_{m}"] = w[i].tolist()
        items.append(item)
    preds = ray.data.from_items(items).map_batches(
        EvalMapper, batch_size=ec.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model_cfg": model_cfg, "adapters": adapters, "methods": methods,
                               "max_new_tokens": ec.max_new_tokens, "use_gpu": ec.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=ec.num_actors), num_cpus=ec.cpus_per_actor,
        num_gpus=1 if ec.use_gpu else 0).to_pandas()
    return preds.set_index("example_id").loc[[r["example_id"] for r in rows]].reset_index()


def build_eval(cfg: Config, run: RunDir, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.evaluate import (accuracy_table, majority_source, own_source_routing_rate,
                                    results_markdown)

    bundle = json.loads(run.bundle.read_text())
    test = pq.read_table(run.data_file("test")).to_pylist()
    _, _, feats = read_features(run.gradient_dir("test"), order=[r["example_id"] for r in test])
    ec = cfg.eval
    weights = routing_weights(cfg, run, feats, ec.methods)
    adapters = {n: run.ref(run.root / p) for n, p in bundle["adapters"].items()}
    names = list(adapters)
    routed = list(weights)
    wide = dict(weights)  # every method's weights over ALL loaded adapters (0 = not run)
    if _trained_baselines(cfg):
        info = json.loads((run.stage_dir("baselines") / "baselines.json").read_text())
        adapters.update({n: run.ref(run.stage_dir("baselines") / p) for n, p in info["adapters"].items()})
        names = list(adapters)
        for m, b in _baseline_weights(cfg, run, test, info).items():
            weights[m] = b["w"]
            wide[m] = np.zeros((len(test), len(names)))
            wide[m][:, [names.index(n) for n in b["names"]]] = b["w"]
        for m in routed:
            wide[m] = np.concatenate([weights[m], np.zeros((len(test), len(names) - weights[m].shape[1]))], 1)
    # The weights of every weighted method per test item (column 0 = base), for the report.
    pq.write_table(pa.table({"example_id": [r["example_id"] for r in test],
                             "source": [r["source"] for r in test],
                             **{f"w_{m}": [w.tolist() for w in weights[m]] for m in weights}}),
                   out / "weights.parquet")
    preds = decode_split(ec, bundle["model"], adapters, test, wide, list(ec.methods))
    pq.write_table(pa.Table.from_pandas(preds, preserve_index=False), out / "predictions.parquet")
    sources = preds["source"].tolist()
    table = accuracy_table(sources, {m: preds[f"score_{m}"].tolist() for m in ec.methods},
                           resamples=ec.bootstrap, seed=cfg.run.seed)
    assignments = pq.read_table(run.clusters_file("assignments.parquet"))
    majority = majority_source(np.asarray(assignments.column("cluster").to_pylist()),
                               assignments.column("source").to_pylist())
    routing = own_source_routing_rate(weights["elrea"][:, 1:], [r["source"] for r in test], majority)
    clusters = json.loads(run.clusters_file("report.json").read_text())
    metrics = {"methods": table, "own_source_routing": routing,
               "clusters": {k: clusters.get(k) for k in ("num_clusters", "sizes", "nmi", "ari", "purity")},
               "cluster_majority_source": {str(k): v for k, v in majority.items()},
               "mean_base_weight": float(weights["elrea"][:, 0].mean())}
    if _trained_baselines(cfg):
        emb = json.loads((run.stage_dir("baselines") / "baselines.json").read_text()).get("embedding_clusters")
        if emb:
            metrics["embedding_clusters"] = emb
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = results_markdown(table, routing, metrics["clusters"])
    (out / "results.md").write_text("# ELREA evaluation (test split)\n\n" + md)
    from elrea_ray.report import write_report

    write_report(run.root, out)
    return {"micro": {m: table[m]["micro"]["acc"] for m in table}, "own_source_routing": routing["rate"]}


# -- the whole run ----------------------------------------------------------------------------------

def check_stage_resources(cfg: Config) -> None:
    """Every stage's CPU/GPU demand against the connected cluster, before stage 0 starts: a
    request that can never be placed (GPUs on a CPU cluster, more CPUs than exist) fails now,
    naming the resource and the config keys, instead of a trainer or actor pool waiting forever.
    On an autoscaling cluster only what no node type could ever hold fails here; the training
    stages ask the autoscaler for their workers and wait when they start."""
    from elrea_ray.train import check_resources

    if not cfg.ray.check_resources:
        return
    t, g, x, e = cfg.train, cfg.gradients, cfg.experts, cfg.eval
    check_resources(t.num_workers, t.cpus_per_worker, t.use_gpu, "stage base (Ray Train)", "train", wait=False)
    # The pool's Parquet listing, read, re-blocking and write tasks need a CPU the actors leave free:
    # with every CPU held by actors, the first read task never starts (measured: a hang).
    check_resources(g.num_actors, g.cpus_per_actor, g.use_gpu, "stage gradients (Ray Data actors)",
                    "gradients", spare_cpus=1.0, wait=False)
    check_resources(1, 1.0, False, "stage clusters (one Ray task)", wait=False)
    check_resources(x.num_workers, x.cpus_per_worker, x.use_gpu, "stage experts (Ray Train)", "experts",
                    gpus_per_worker=x.gpus_per_worker, wait=False)
    check_resources(e.num_actors, e.cpus_per_actor, e.use_gpu, "stage eval (Ray Data actors)", "eval", wait=False)


def run_pipeline(cfg: Config, log=print) -> RunDir:
    """Run (or resume) every stage; returns the run directory. Needs a connected Ray."""
    run = RunDir.at(cfg.run.run_dir, cfg.run.local_dir)
    keys = stage_keys(cfg)
    with run.lock():
        check_stage_resources(cfg)
        run.pull(log=log)  # an object-store run: the mirror catches up (a fresh machine resumes)
        (run.root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run.publish(run.root / "config.yaml")
        run.update_manifest(lambda m: m.update({"config": cfg.to_dict(), "versions": _versions(),
                                                "keys": keys, "updated": time.time()}))
        t0 = time.time()
        run.run_stage("data", keys["data"], lambda out: build_data(cfg, out), log)
        run.run_stage("base", keys["base"], lambda out: build_base(cfg, run, keys, out), log)
        run.run_stage("gradients", keys["gradients"], lambda out: build_gradients(cfg, run, out), log)
        run.run_stage("clusters", keys["clusters"], lambda out: build_clusters(cfg, run, out), log)
        _, ran = run.run_stage("experts", keys["experts"], lambda out: build_experts(cfg, run, keys, out), log)
        if ran or not run.bundle.exists() or json.loads(run.bundle.read_text()).get("keys") != keys:
            write_bundle(cfg, run, keys)
        if "baselines" in keys:
            run.run_stage("baselines", keys["baselines"], lambda out: build_baselines(cfg, run, keys, out), log)
        run.run_stage("eval", keys["eval"], lambda out: build_eval(cfg, run, out), log)
        if not run.eval_file("report.html").exists():  # an eval finished before reports existed
            from elrea_ray.report import write_report

            log(f"[report] {write_report(run.root)['html']}")
            run.sync_up("eval")
        log(f"pipeline finished in {time.time() - t0:.0f} s; run directory {run.root}")
    return run
