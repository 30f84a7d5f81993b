"""Stages 1 and 4: LoRA SFT with Ray Train (`TorchTrainer`, DDP over `num_workers`).

One training loop serves both the base adapter (fresh LoRA, all data, keeps every epoch's adapter
and Adam state for the gradient stage) and the experts (warm-started from the final base adapter,
one cluster's examples). Mid-epoch checkpoints go through `ray.train.report`, so a killed worker or
a rerun of the same stage key resumes from the last one instead of step 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elrea_ray import resources
from elrea_ray.config import ModelConfig, TrainConfig
from elrea_ray.resources import worker_bundle


def response_cross_entropy(net, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of a collated batch.

    The LM head runs only at the positions that predict a response token (transformers'
    boolean `logits_to_keep`): instruction and padding positions never reach the
    vocabulary-sized projection, which otherwise dominates activation memory and costs about a
    fifth of a small model's compute. Same sum as full logits up to float rounding (tested). A
    model class that does not take or honour the mask gets the full-logits computation.
    """
    from elrea_ray.checkpoints import unwrap

    labels = batch["labels"]
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != -100
    inner = unwrap(net)  # under DDP; then the transformers model under PEFT decides slicing
    cls = type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)
    if _HEAD_SLICING.get(cls, True):
        try:
            out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        except TypeError:  # a forward without logits_to_keep
            out = None
        _HEAD_SLICING[cls] = out is not None and out.dim() == 2 and out.shape[0] == int(keep.sum())
        if _HEAD_SLICING[cls]:
            return torch.nn.functional.cross_entropy(out.float(), shifted[keep], reduction="sum")
    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        out.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum"
    )


_HEAD_SLICING: dict[type, bool] = {}  # per model class: does its forward honour a boolean mask?


def _log(line: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver. Not `print`: Ray Train
    patches print into its logger AND the original stream, so each line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _lr_lambda(total_steps: int, warmup_steps: int):
    # Paper: linear decay to 0 (warmup not stated; 0 by default).
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def _load_examples(data_file: str, example_ids: list[str] | None, tok, max_length: int):
    import json

    import pyarrow.parquet as pq

    from elrea_ray.data import encode, sft_labels

    table = pq.read_table(data_file, columns=["example_id", "prompt", "response"]).to_pylist()
    if example_ids is not None:
        keep = set(example_ids)
        table = [r for r in table if r["example_id"] in keep]
    ids, labels, dropped = [], [], 0
    for r in table:
        enc = encode(tok, json.loads(r["prompt"]), r["response"], max_length)
        if enc is None:
            dropped += 1
            continue
        ids.append(enc["input_ids"])
        labels.append(sft_labels(enc["input_ids"], enc["instruction_len"]))
    return ids, labels, dropped


def _response_tokens(labels: list[int]) -> int:
    """Tokens a row contributes to the loss: labels shifted by one, ignoring -100."""
    return sum(1 for t in labels[1:] if t != -100)


def _rank_micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's share of one optimiser step, cut into micro-batches.

    The step's rows are padded up to world x ceil(len / world) and dealt out round-robin, so every
    rank runs the same number of micro-batches (DDP all-reduces once per synced backward; ranks
    that disagree on the count hang). Padding slots are dropped; a micro-batch left with no rows
    is an empty list, which the caller runs as a zero-weight backward.
    e.g. 5 rows, 3 ranks, micro 1: ranks hold 2, 2, 1 rows, and all run 2 micro-batches."""
    per_rank = math.ceil(len(batch) / world)
    slots = [batch[j] if j < len(batch) else None for j in range(per_rank * world)][rank::world]
    return [[i for i in slots[m : m + micro] if i is not None] for m in range(0, per_rank, micro)]


def _accumulate_step(
    net, batch, ids, labels, rank: int, world: int, micro: int, pad_id: int, device
) -> tuple[float, int]:
    """Forward and backward of this rank's share of one optimiser step; returns (summed response
    cross-entropy, response tokens), both of the whole step over all ranks.

    Loss = sum of cross-entropy over the step's response tokens / the step's global token count,
    what one process computing the whole batch would get; DDP averages gradients over ranks, so
    each rank's loss is scaled by world to undo that mean. Every rank holds the same batch list
    (same seed), so the global count needs no all-reduce. Gradients of all but the last
    micro-batch stay local (`no_sync`); the last backward all-reduces the accumulated sum.
    The loss sum is all-reduced over ranks only for logging."""
    from contextlib import nullcontext

    from elrea_ray.data import collate

    n_tokens = max(1, sum(_response_tokens(labels[i]) for i in batch))
    micro_batches = _rank_micro_batches(batch, rank, world, micro)
    total_loss = 0.0
    for j, rows in enumerate(micro_batches):
        weight = world / n_tokens
        if not rows:  # padding only: a real row at weight 0 keeps this rank in DDP's all-reduce
            rows, weight = batch[:1], 0.0
        b = collate([ids[i] for i in rows], [labels[i] for i in rows], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        last = j == len(micro_batches) - 1
        with net.no_sync() if world > 1 and not last else nullcontext():
            ce = response_cross_entropy(net, b)
            (ce * weight).backward()
        if weight:
            total_loss += ce.item()
    if world > 1:  # the logged loss is the whole step's, not this rank's share
        summed = torch.tensor([total_loss], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        total_loss = float(summed.item())
    return total_loss, n_tokens


@dataclass
class _Progress:
    """Where a training run stands; saved in every resume checkpoint."""

    step: int = 0
    lr_sum: float = 0.0  # sum of the step learning rates in the current epoch (its mean_lr)
    last_loss: float = float("nan")
    history: list[dict] = field(default_factory=list)  # every logged {step, epoch, loss, lr}


def _setup(cfg: dict, tc: TrainConfig, mc: ModelConfig, device, world: int, n_examples: int):
    """(model, DDP-wrapped net, Adam, linear schedule, steps per epoch, total steps)."""
    from elrea_ray import storage
    from elrea_ray.model import load_adapters, lora_parameters, new_lora_model

    if cfg.get("init_adapter"):
        model = load_adapters(mc, {"default": str(storage.localize(cfg["init_adapter"]))}, device, is_trainable=True)
    else:
        model = new_lora_model(mc, device, seed=cfg["seed"])
    model.train()
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.Adam(
        params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
    # e.g. 2000 examples / batch 16 = 125 steps per epoch, x 2 epochs = 250 steps. A job's
    # max_steps overrides the epochs: the shuffled epochs repeat and the last one is cut.
    steps_per_epoch = math.ceil(n_examples / tc.batch_size)
    total = cfg.get("max_steps") or steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(tc.warmup_ratio * total)))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model, net, opt, sched, steps_per_epoch, total


def _resume(model, opt, sched, rank: int, device) -> _Progress:
    """The progress of the last resume checkpoint Ray Train hands this run (weights, Adam, schedule
    and this rank's RNG restored into the objects), or a fresh start."""
    import ray.train

    from elrea_ray.model import lora_parameters

    start = ray.train.get_checkpoint()
    if start is None:
        return _Progress()
    with start.as_directory() as d:
        state = torch.load(Path(d) / "train_state.pt", weights_only=False)
        rng_file = Path(d) / f"rng-rank{rank}.pt"
        rng_state = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    with torch.no_grad():
        for (n, p), saved in zip(lora_parameters(model), state["params"]):
            p.copy_(saved.to(p.device))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # Each rank's RNG (dropout masks) continues where it was, so a resumed run computes the
    # same steps as one that was never interrupted (bitwise on CPU).
    if rng_state is not None:
        torch.set_rng_state(rng_state["cpu"])
        if rng_state.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng_state["cuda"], device)
    return _Progress(
        state["step"], state["lr_sum"], state.get("last_loss", float("nan")), list(state.get("history", []))
    )


def _save_epoch(cfg: dict, out_dir: Path, model, opt, sched, p: _Progress, epoch: int, steps_per_epoch: int) -> None:
    """adapters/base/epoch-E/: the adapter, Adam state and parameter layout the gradient stage reads."""
    from elrea_ray import storage
    from elrea_ray.checkpoints import parameter_layout, save_epoch_checkpoint

    folder = out_dir / f"epoch-{epoch}"
    save_epoch_checkpoint(
        folder, model, opt, step=p.step, lr=sched.get_last_lr()[0], mean_lr=p.lr_sum / steps_per_epoch, epoch=epoch
    )
    (folder / "parameter_layout.json").write_text(json.dumps(parameter_layout(model)))
    if storage.is_remote(cfg["out_dir"]):
        storage.push_dir(folder, storage.join(cfg["out_dir"], folder.name))
        shutil.rmtree(folder)


def _save_final(
    cfg: dict, out_dir: Path, model, p: _Progress, steps_per_epoch: int, total: int, examples: int, seen: int
) -> None:
    """The trained adapter (and train_log.json beside it), saved beside and renamed into place: a kill
    mid-save never leaves a folder that looks finished (the experts stage skips experts whose
    folder exists after a driver restart)."""
    from elrea_ray import storage

    final = out_dir if not cfg.get("save_epochs") else out_dir / "final"
    tmp = final.with_name(final.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    # The loss curve, beside the adapter (Ray Train v2 keeps only the latest checkpoint's metrics).
    (out_dir / "train_log.json").write_text(
        json.dumps(
            {
                "name": cfg["name"],
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total,
                "examples": examples,
                "examples_seen": seen,
                "log": p.history,
            }
        )
    )
    if storage.is_remote(cfg["out_dir"]):  # adapter_config.json last: the stage skips experts whose folder has it
        storage.push_dir(out_dir, cfg["out_dir"], last="adapter_config.json")


def train_loop(cfg: dict) -> dict:
    """Runs on every Ray Train worker. `cfg` holds plain values only (paths, dicts)."""
    import ray.train
    import ray.train.torch

    from elrea_ray import storage
    from elrea_ray.data import length_bucketed_batches
    from elrea_ray.model import load_tokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, mc = TrainConfig(**cfg["train"]), ModelConfig(**cfg["model"])
    name, seed = cfg["name"], cfg["seed"]
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    torch.manual_seed(seed)
    tok = load_tokenizer(mc)
    ids, labels, dropped = _training_rows(cfg, tok, mc)
    model, net, opt, sched, steps_per_epoch, total = _setup(cfg, tc, mc, device, world, len(ids))
    # Rank 0 writes into out_dir; for an object-store run that is a URI, so it writes into a
    # local staging folder and uploads (epoch folders as they finish, the adapter last).
    remote_out = storage.is_remote(cfg["out_dir"])
    out_dir = Path(tempfile.mkdtemp(prefix=f"elrea-{name}-")) if remote_out else Path(cfg["out_dir"])
    p = _resume(model, opt, sched, rank, device)
    if p.step and rank == 0:
        _log(f"[{name}] resumed from step {p.step}/{total}")
    tally = cfg.get("tally") if rank == 0 else None  # the driver's progress lines (elrea_ray.progress)
    _count(tally, name, p.step, total)
    resumed_from = p.step
    lengths = [len(x) for x in ids]
    loss_window: list[float] = []
    for epoch in range(p.step // steps_per_epoch, math.ceil(total / steps_per_epoch)):
        batches = length_bucketed_batches(lengths, tc.batch_size, seed=seed + epoch)
        for b_idx, batch in enumerate(batches[: total - epoch * steps_per_epoch]):
            if epoch * steps_per_epoch + b_idx < p.step:
                continue  # done before the resume point
            total_loss, n_tokens = _accumulate_step(
                net, batch, ids, labels, rank, world, tc.micro_batch_size, tok.pad_token_id, device
            )
            p.lr_sum += sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            p.step += 1
            _count(tally, name, p.step, total)
            loss_window.append(total_loss / max(1, n_tokens))
            _maybe_inject_fault(cfg, p.step, rank)
            _after_step(cfg, tc, out_dir, model, opt, sched, p, loss_window, epoch + 1, steps_per_epoch, total, rank)
    seen = examples_seen(lengths, tc.batch_size, seed, total)
    if rank == 0:
        _save_final(cfg, out_dir, model, p, steps_per_epoch, total, len(ids), seen)
    _count(tally, name, p.step, total, wait=True)  # the last count is in before the run ends
    if remote_out:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "final_loss": p.last_loss,
        "steps": p.step,
        "examples": len(ids),
        "examples_seen": seen,
        "dropped_too_long": dropped,
        "resumed_from_step": resumed_from,
    }


def _training_rows(cfg: dict, tok, mc: ModelConfig) -> tuple[list[list[int]], list[list[int]], int]:
    """(input ids, labels, rows dropped as longer than model.max_length) of this job's rows."""
    from elrea_ray import storage

    ids, labels, dropped = _load_examples(
        str(storage.localize(cfg["data_file"])), cfg.get("example_ids"), tok, mc.max_length
    )
    if not ids:
        raise ValueError(
            f"{cfg['name']}: no training examples left (dropped {dropped} longer than model.max_length={mc.max_length})"
        )
    return ids, labels, dropped


def _after_step(
    cfg: dict,
    tc: TrainConfig,
    out_dir: Path,
    model,
    opt,
    sched,
    p,
    loss_window: list[float],
    epoch: int,
    steps_per_epoch: int,
    total: int,
    rank: int,
) -> None:
    """At an epoch's end: its adapter and optimiser state saved (rank 0, when wanted) and the
    lr sum reset; every logging_steps (and at an epoch's end): the loss logged and reported,
    with a resume checkpoint every checkpoint_every_steps."""
    epoch_end = p.step % steps_per_epoch == 0 or p.step == total
    if epoch_end and rank == 0 and cfg.get("save_epochs"):
        # Written before the resume checkpoint below, so a kill in between redoes it.
        _save_epoch(cfg, out_dir, model, opt, sched, p, epoch, steps_per_epoch)
    if epoch_end:
        p.lr_sum = 0.0
    if p.step % tc.logging_steps == 0 or epoch_end:
        _log_and_report(
            cfg["name"],
            model,
            opt,
            sched,
            p,
            loss_window,
            epoch,
            total,
            rank,
            checkpoint=p.step % tc.checkpoint_every_steps == 0 or epoch_end,
        )


def _count(tally, name: str, step: int, total: int, wait: bool = False) -> None:
    """This run's (step, total steps) into the driver's Tally actor (elrea_ray.progress)."""
    from elrea_ray.progress import tell

    tell(tally, "put", name, (step, total), wait=wait)


def planned_steps(job: dict, rows: int | None = None) -> int | None:
    """The optimiser steps a `fit_adapter` job will take, for progress lines before its workers
    report: max_steps, else ceil(rows / batch) x epochs, rows = its example ids or, when it trains
    on all rows, `rows` (None if not given: the run reports its count when it starts). Rows
    dropped as too long can make it a little less; the run's own count then replaces it."""
    loop, tc = job["loop_cfg"], job["tc"]
    if loop.get("max_steps"):
        return loop["max_steps"]
    n = rows if loop.get("example_ids") is None else len(loop["example_ids"])
    return None if n is None else math.ceil(n / tc.batch_size) * tc.epochs


def examples_seen(lengths: list[int], batch_size: int, seed: int, total: int) -> int:
    """Rows the first `total` optimiser steps of train_loop's batch order go through (epoch e
    shuffled with seed + e); e.g. 480 rows, batch 16, 64 steps: 2 epochs of 30 steps, then 4 more
    batches of 16 = 1024."""
    from elrea_ray.data import length_bucketed_batches

    seen, epoch = 0, 0
    while total > 0:
        batches = length_bucketed_batches(lengths, batch_size, seed=seed + epoch)[:total]
        seen += sum(len(b) for b in batches)
        total -= len(batches)
        epoch += 1
    return seen


def _log_and_report(
    name: str,
    model,
    opt,
    sched,
    p: _Progress,
    loss_window: list[float],
    epoch: int,
    total: int,
    rank: int,
    checkpoint: bool,
) -> None:
    """The mean loss since the last log into the history and the driver's log; reported to Ray
    Train, with a resume checkpoint when `checkpoint`."""
    import ray.train

    p.last_loss = sum(loss_window) / len(loss_window)
    loss_window.clear()
    metrics = {"loss": p.last_loss, "step": p.step, "epoch": epoch, "lr": sched.get_last_lr()[0]}
    p.history.append(metrics)
    if rank == 0:
        _log(f"[{name}] step {p.step}/{total} epoch {epoch} loss {p.last_loss:.4f} lr {metrics['lr']:.2e}")
    if checkpoint:
        _report_with_checkpoint(metrics, model, opt, sched, p.step, p.lr_sum, rank, p.last_loss, p.history)
    else:
        ray.train.report(metrics)


def _maybe_inject_fault(cfg: dict, step: int, rank: int) -> None:
    """Test hook (never set by the pipeline): `fault = {"after_step": N, "rank": r, "marker": path,
    "wait_s": s}` in the loop config makes that rank's process die s seconds after step N, once
    (the marker file records that it already happened), as a crashed worker would."""
    fault = cfg.get("fault")
    if not fault or step != fault["after_step"] or rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(step))
    time.sleep(fault.get("wait_s", 0))
    os._exit(1)


def _report_with_checkpoint(metrics, model, opt, sched, step, lr_sum, rank, last_loss, history=()) -> None:
    import ray.train

    from elrea_ray.model import lora_parameters

    with tempfile.TemporaryDirectory() as d:
        # Every rank adds its own RNG state (Ray merges the ranks' checkpoint folders); rank 0
        # adds the LoRA weights, Adam and the schedule.
        torch.save(
            {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
            Path(d) / f"rng-rank{rank}.pt",
        )
        if rank == 0:
            torch.save(
                {
                    "params": [p.detach().cpu() for _, p in lora_parameters(model)],
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "lr_sum": lr_sum,
                    "last_loss": last_loss,
                    "history": list(history),
                },
                Path(d) / "train_state.pt",
            )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def check_resources(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    what: str,
    keys: str | None = None,
    gpus_per_worker: float = 1.0,
    spare_cpus: float = 0.0,
    wait_s: float = 300.0,
    wait: bool = True,
) -> None:
    """Fail at once for a request no node (type) could ever hold, else wait for the autoscaler
    (elrea_ray.resources); Ray itself would wait forever."""
    resources.check_resources(
        num_workers, worker_bundle(cpus_per_worker, use_gpu, gpus_per_worker), what, keys, spare_cpus, wait_s, wait=wait
    )


def fit_adapter(
    run_name: str,
    loop_cfg: dict,
    tc: TrainConfig,
    storage: str | Path,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    gpus_per_worker: float = 1.0,
    check: bool = True,
    wait_s: float = 300.0,
    tally=None,
) -> dict:
    """One `TorchTrainer.fit()`; the same (storage, run_name) resumes a run killed earlier.
    `storage` may be an s3:// URI: Ray Train then keeps its checkpoints in the object store.
    tally: a `Progress.training` actor that rank 0 puts its step count into."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from elrea_ray import storage as store

    storage_fs = None
    if store.is_remote(storage):
        storage_fs, storage = store.filesystem(str(storage))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg if tally is None else {**loop_cfg, "tally": tally},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_bundle(cpus_per_worker, use_gpu, gpus_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage),
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        ),
    )
    # With `check`, a request the cluster lacks now is asked of the autoscaler (beside every other
    # expert's) and waited for up to wait_s (ray.resource_wait_s), and kept while the run places
    # its workers; the request is withdrawn when the run ends.
    bundle = worker_bundle(cpus_per_worker, use_gpu, gpus_per_worker)
    held = (
        resources.resources_for(num_workers, bundle, f"training {run_name}", wait_s=wait_s)
        if check
        else contextlib.nullcontext()
    )
    with held:
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training {run_name} failed: {result.error}")
    return dict(result.return_value or {})


def fit_many(jobs: list[dict[str, Any]], max_concurrent: int, tally=None) -> list[dict]:
    """Run several `fit_adapter` calls at once (one thread each, at most `max_concurrent`), all
    counting their steps into `tally` when given.

    Every job's resources are checked before any starts, so an impossible request fails at once
    rather than after the feasible experts have trained."""
    for job in jobs:
        if job.get("check", True):
            check_resources(
                job["num_workers"],
                job["cpus_per_worker"],
                job["use_gpu"],
                f"training {job['run_name']}",
                gpus_per_worker=job.get("gpus_per_worker", 1.0),
                wait=False,
            )
    sem = threading.Semaphore(max_concurrent)

    def one(job):
        with sem:
            return fit_adapter(**job, tally=tally)

    with ThreadPoolExecutor(max_workers=max(1, min(max_concurrent, len(jobs)))) as ex:
        return list(ex.map(one, jobs))
