"""Stage 3b, behind routing.method / eval.methods: the distilled router (beyond the paper;
elrea_ray/distill.py), a head on the prompt's pooled hidden state fitted to the gradient routing
weights of the training rows, in one Ray task.

The targets are the training rows' dense gradient weights (ELREA eq. 5.9-5.10 from their features
and the centroids; routing.top_k and min_weight apply afterwards to either router's weights, as
`elrea_ray.routing.sparsify`). The hidden states are the mean over the prompt's tokens of the last
hidden state of the base model with the final base adapter, what the ensemble's base row computes
in a prefill. Writes router/router.json + router.safetensors (the head), weights.parquet (the test
split's w_gradient and w_distilled, [1 + C] dense weights per item, column 0 = base) and
router_eval.json (top-1 agreement and mean |base weight difference| on train and test, and the
routing seconds per prompt of each router, measured in the same task).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from elrea_ray.artifacts import ArtifactError
from elrea_ray.config import Config
from elrea_ray.stages.common import StageContext, plain

# The gradient router's cost is measured on this many test prompts (E forward+backward each);
# the distilled router's on the whole test split (one forward each).
COST_ROWS = 32
GOAL_AGREEMENT = 0.95  # top-1 agreement with the gradient router on the test split


def wanted(cfg: Config) -> bool:
    """Whether the run trains the router: only when routing.method=distilled or eval.methods has
    elrea_distilled. It is cheap (one forward per training prompt and a small fit), but a run that
    routes by gradients alone would otherwise gain a stage, a Ray task holding a model, and new
    eval keys, for an artifact nothing of it reads."""
    return cfg.routing.method == "distilled" or "elrea_distilled" in cfg.eval.methods


def config_of(cfg: Config) -> dict:
    """What the fit depends on besides its inputs' keys: the targets' temperature, the head's shape."""
    rc = cfg.routing
    return {"temperature": rc.temperature, "distill_hidden": rc.distill_hidden, "distill_epochs": rc.distill_epochs}


def gradient_weights(folder: Path, ids: list[str], centroids: np.ndarray, temperature: float) -> np.ndarray:
    """[N, 1 + C] float64 dense gradient routing weights (column 0 = base) of the rows `ids`, in that
    order, streamed from the split's feature shards (the driver never holds the feature table)."""
    from elrea_ray.routing import route
    from elrea_ray.stages.clusters import feature_batches

    at = {e: i for i, e in enumerate(ids)}
    out = np.full((len(ids), 1 + len(centroids)), np.nan)
    for batch_ids, _, X in feature_batches(folder):
        pos = [at.get(e, -1) for e in batch_ids]
        if min(pos) < 0:
            raise ArtifactError(
                f"gradient features {folder} do not match the data: example id "
                f"{batch_ids[pos.index(-1)]!r} is not in the data file"
            )
        out[pos, 1:], out[pos, 0] = route(X, centroids, temperature=temperature)
    if np.isnan(out).any():
        missing = ids[int(np.argmax(np.isnan(out).any(1)))]
        raise ArtifactError(f"gradient features {folder} do not match the data: no feature for {missing!r}")
    return out


def _gradient_seconds(model, cfg: dict, ids: list[list[int]], centroids: np.ndarray, device: str) -> float:
    """Seconds per prompt of gradient routing (features of `ids` on the shared model, then route)."""
    from elrea_ray.config import ModelConfig
    from elrea_ray.gradients import FeatureExtractor
    from elrea_ray.routing import route

    g = cfg["gradients"]
    fx = FeatureExtractor(
        ModelConfig(**cfg["model"]),
        cfg["checkpoints"],
        cfg["epoch_weights"],
        g["projector"],
        g["d_proj"],
        g["projector_seed"],
        device=device,
        batch_size=g["batch_size"],
        model=model,
    )
    fx.features(ids[:1])  # warm-up, as the hidden states' pass is warmed up by the training prompts
    t0 = time.perf_counter()
    route(fx.features(ids), centroids, temperature=cfg["temperature"])
    return (time.perf_counter() - t0) / len(ids)


def distill(cfg: dict, prompts: dict[str, list[str]], targets: np.ndarray, centroids: np.ndarray) -> dict:
    """Ray task body: pooled hidden states of the train and test prompts (final base adapter), the
    head fitted on the training ones to `targets` [N_train, 1 + C], its dense predictions
    [N, 1 + C] of both splits and each router's seconds per test prompt. cfg: model, adapter,
    checkpoints, epoch_weights, gradients, temperature, hidden, epochs, seed, use_gpu, threads."""
    import torch

    from elrea_ray.config import ModelConfig
    from elrea_ray.data import instruction_ids
    from elrea_ray.distill import fit_router, pooled_hidden_states
    from elrea_ray.model import load_adapters, load_tokenizer
    from elrea_ray.storage import localize

    torch.set_num_threads(cfg["threads"])
    mc = ModelConfig(**cfg["model"])
    tok = load_tokenizer(mc)
    device = "cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"
    model = load_adapters(mc, {"base": str(localize(cfg["adapter"]))}, device)
    ids = {s: [instruction_ids(tok, p, mc.max_length) for p in ps] for s, ps in prompts.items()}
    batch = cfg["gradients"]["batch_size"]
    h_train = pooled_hidden_states(model, ids["train"], tok.pad_token_id, batch)
    router = fit_router(
        h_train, targets[:, 1:], targets[:, 0], hidden=cfg["hidden"], epochs=cfg["epochs"], seed=cfg["seed"]
    )
    t0 = time.perf_counter()
    predicted = {
        "train": router.predict(h_train),
        "test": router.predict(pooled_hidden_states(model, ids["test"], tok.pad_token_id, batch)),
    }
    distilled_s = (time.perf_counter() - t0) / max(1, len(ids["test"]))
    gradient_s = (
        _gradient_seconds(
            model,
            {**cfg, "checkpoints": [str(localize(c)) for c in cfg["checkpoints"]]},
            ids["test"][:COST_ROWS],
            centroids,
            device,
        )
        if ids["test"]
        else float("nan")
    )
    return {
        "router": router,
        "seconds_per_prompt": {"gradient": gradient_s, "distilled": distilled_s},
        **{s: np.concatenate([b[:, None], e], axis=1) for s, (e, b) in predicted.items()},
    }


def agreement(gradient: np.ndarray, distilled: np.ndarray) -> dict:
    """How closely the distilled weights follow the gradient ones ([N, 1 + C] each, column 0 = base)."""
    from elrea_ray.distill import top1_agreement

    return {
        "n": len(gradient),
        "top1_agreement": top1_agreement(gradient[:, 1:], distilled[:, 1:]),
        "mean_abs_base_diff": float(np.abs(gradient[:, 0] - distilled[:, 0]).mean()),
    }


def run(ctx: StageContext) -> dict:
    """Writes router/ (see above); returns the top-1 agreement on train and test."""
    import pyarrow.parquet as pq
    import ray
    from safetensors.numpy import load_file

    from elrea_ray.evaluate import write_weights
    from elrea_ray.stages.gradients import epoch_weights

    cfg, run_dir, out = ctx.cfg, ctx.run, ctx.out
    rc, g = cfg.routing, cfg.gradients
    rows = {
        s: pq.read_table(run_dir.data_file(s), columns=["example_id", "source", "prompt"]).to_pylist()
        for s in ("train", "test")
    }
    centroids = load_file(str(run_dir.clusters_file("centroids.safetensors")))["centroids"]
    target = {
        s: gradient_weights(run_dir.gradient_dir(s), [r["example_id"] for r in rows[s]], centroids, rc.temperature)
        for s in rows
    }
    job = {
        "model": plain(cfg.model),
        "adapter": run_dir.ref(run_dir.base_epoch(cfg.train.epochs)),
        "checkpoints": [run_dir.ref(run_dir.base_epoch(e)) for e in range(1, cfg.train.epochs + 1)],
        "epoch_weights": epoch_weights(cfg, run_dir),
        "gradients": plain(g),
        "temperature": rc.temperature,
        "hidden": rc.distill_hidden,
        "epochs": rc.distill_epochs,
        "seed": cfg.run.seed,
        "use_gpu": g.use_gpu,
        "threads": max(1, int(g.cpus_per_actor)),
    }
    # Where the gradient features ran: the same model, device and resources (checked before stage 0).
    task = ray.remote(num_cpus=g.cpus_per_actor, num_gpus=1 if g.use_gpu else 0)(distill)
    got = ray.get(task.remote(job, {s: [r["prompt"] for r in rows[s]] for s in rows}, target["train"], centroids))
    got["router"].save(out)
    write_weights(out / "weights.parquet", rows["test"], {"gradient": target["test"], "distilled": got["test"]})
    report = {
        "num_experts": int(len(centroids)),
        "hidden": rc.distill_hidden,
        "epochs": rc.distill_epochs,
        "goal_top1_agreement": GOAL_AGREEMENT,
        "train": agreement(target["train"], got["train"]),
        "test": agreement(target["test"], got["test"]),
        "seconds_per_prompt": got["seconds_per_prompt"],
        "cost_rows": {"gradient": min(COST_ROWS, len(rows["test"])), "distilled": len(rows["test"])},
    }
    (out / "router_eval.json").write_text(json.dumps(report, indent=2))
    return {s: report[s]["top1_agreement"] for s in ("train", "test")}
