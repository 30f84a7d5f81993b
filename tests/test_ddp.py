"""Data-parallel training computes the same update on 1, 2 and 3 workers.

23 rows, batch 6, micro-batch 1: 4 steps per epoch whose last holds 5 rows, so with 2 or 3
workers some ranks hold fewer rows than others (padding, zero-weight backward) and every step
accumulates several micro-batches (no_sync on all but the last)."""

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elrea_ray.config import ModelConfig, TrainConfig

HANG_GUARD_S = 240  # generous: one tiny fit takes seconds; a DDP collective mismatch hangs forever


def _data_file(path, n=23):
    rows = [
        {
            "example_id": f"ex-{i:02d}",
            "prompt": json.dumps([{"role": "user", "content": "count " + " ".join(["a"] * (1 + i % 5))}]),
            "response": " ".join(["b"] * (1 + (i * 7) % 4)),
        }
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _fit(tmp_path, name, workers, data_file, example_ids=None, init_adapter=None):
    from dataclasses import asdict

    from safetensors.torch import load_file

    from elrea_ray.train import fit_adapter

    mc = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0, max_length=256)
    tc = TrainConfig(
        num_workers=workers,
        epochs=2,
        lr=1e-3,
        batch_size=6,
        micro_batch_size=1,
        checkpoint_every_steps=100,
        logging_steps=2,
    )
    out = tmp_path / name
    loop = {
        "name": name,
        "seed": 0,
        "model": asdict(mc),
        "train": asdict(tc),
        "data_file": str(data_file),
        "example_ids": example_ids,
        "init_adapter": init_adapter,
        "out_dir": str(out),
        "save_epochs": False,
    }
    result = {}

    def run():
        try:
            result["value"] = fit_adapter(name, loop, tc, tmp_path / "ray", workers, 1.0, False)
        except BaseException as e:  # re-raised in the test thread
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), f"{name}: training with {workers} workers did not finish in {HANG_GUARD_S} s"
    if "error" in result:
        raise result["error"]
    return result["value"], load_file(str(out / "adapter_model.safetensors")), out


def _rel_diff(a, b):
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


def test_rank_micro_batches_are_equal_in_number_and_cover_each_row_once():
    from elrea_ray.train import _rank_micro_batches

    for n, world, micro in [(5, 3, 1), (6, 2, 2), (1, 3, 2), (7, 2, 3)]:
        batch = list(range(100, 100 + n))
        parts = [_rank_micro_batches(batch, r, world, micro) for r in range(world)]
        assert len({len(p) for p in parts}) == 1, (n, world, micro, parts)
        rows = sorted(i for p in parts for m in p for i in m)
        assert rows == batch


def test_one_two_and_three_workers_give_the_same_adapter_then_experts_too(ray_local, tmp_path):
    data = _data_file(tmp_path / "train.parquet")
    results, weights = {}, {}
    for w in (1, 2, 3):
        results[w], weights[w], out = _fit(tmp_path, f"base-w{w}", w, data)
        if w == 1:
            base_out = out
    assert {r["steps"] for r in results.values()} == {8}  # ceil(23 / 6) = 4 steps x 2 epochs
    for w in (2, 3):
        rel = _rel_diff(weights[1], weights[w])
        assert rel <= 1e-4, (w, rel)
        assert results[w]["final_loss"] == pytest.approx(results[1]["final_loss"], rel=1e-4)
    # the experts' path: warm start from the base adapter, an uneven subset of 13 rows
    subset = [f"ex-{i:02d}" for i in range(0, 23) if i % 5 != 1][:13]
    e1 = _fit(tmp_path, "expert-w1", 1, data, subset, str(base_out))
    e2 = _fit(tmp_path, "expert-w2", 2, data, subset, str(base_out))
    assert e1[0]["examples"] == e2[0]["examples"] == 13
    assert _rel_diff(weights[1], e1[1]) > 1e-3  # the expert did move away from the base
    assert _rel_diff(e1[1], e2[1]) <= 1e-4
