"""Concurrent expert trainers bounded by resources: what each worker reserves (CPUs, whole or
fractional GPUs) and requests that can never be placed failing at once, naming the resource,
instead of Ray Train waiting for them forever."""

import pytest

from conftest import SMOKE
from elrea_ray.config import ConfigError, TrainConfig, load_config
from elrea_ray.train import fit_many, resource_problem, worker_bundle


def test_worker_bundle_whole_and_fractional_gpus():
    assert worker_bundle(1.0, False, 0.5) == {"CPU": 1.0}
    assert worker_bundle(2.0, True, 0.5) == {"CPU": 2.0, "GPU": 0.5}


def test_resource_problem_names_the_resource():
    one_node = [{"CPU": 4.0}]
    assert resource_problem(2, {"CPU": 2.0}, {"CPU": 4.0}, one_node) is None
    msg = resource_problem(3, {"CPU": 2.0}, {"CPU": 4.0}, one_node)
    assert "needs 6 CPUs (3 x 2)" in msg and "has 4 CPU" in msg
    msg = resource_problem(1, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0}, one_node)
    assert "GPU" in msg and "use_gpu=false" in msg
    # enough in total, but a worker's bundle cannot span nodes
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    msg = resource_problem(1, {"CPU": 3.0}, {"CPU": 6.0}, nodes)
    assert "single node" in msg and "largest: CPU 2" in msg
    # two experts' workers at 0.5 GPU each share one GPU
    gpu_node = [{"CPU": 8.0, "GPU": 1.0}]
    assert resource_problem(2, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 8.0, "GPU": 1.0}, gpu_node) is None


def test_gpus_per_worker_is_validated_and_stays_out_of_stage_keys(tmp_path):
    from elrea_ray.pipeline import stage_keys

    with pytest.raises(ConfigError, match="experts.gpus_per_worker"):
        load_config(SMOKE, ["experts.gpus_per_worker=1.5"])
    a = stage_keys(load_config(SMOKE))
    assert a == stage_keys(load_config(SMOKE, ["experts.gpus_per_worker=0.25", "experts.max_concurrent=4"]))


@pytest.mark.parametrize("override,needle", [({"cpus_per_worker": 64.0}, "CPU"),
                                             ({"use_gpu": True}, "GPU")])
def test_infeasible_expert_trainer_fails_before_any_starts(ray_local, tmp_path, override, needle):
    ok = {"run_name": "ok", "loop_cfg": {}, "tc": TrainConfig(), "storage": tmp_path, "num_workers": 1,
          "cpus_per_worker": 1.0, "use_gpu": False}
    bad = {**ok, "run_name": "expert-bad", **override}
    # The feasible job would fail inside training (empty loop config) if it were started at all.
    with pytest.raises(RuntimeError, match=rf"expert-bad: needs .*{needle}"):
        fit_many([ok, bad], max_concurrent=2)
