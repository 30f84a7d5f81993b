"""Concurrent expert trainers bounded by resources: what each worker reserves (CPUs, whole or
fractional GPUs) and requests that can never be placed failing at once, naming the resource,
instead of Ray Train waiting for them forever."""

import pytest
from conftest import SMOKE

from elrea_ray.config import ConfigError, TrainConfig, load_config
from elrea_ray.resources import resource_problem, worker_bundle
from elrea_ray.train import fit_many


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


@pytest.mark.parametrize("override,needle", [({"cpus_per_worker": 64.0}, "CPU"), ({"use_gpu": True}, "GPU")])
def test_infeasible_expert_trainer_fails_before_any_starts(ray_local, tmp_path, override, needle):
    ok = {
        "run_name": "ok",
        "loop_cfg": {},
        "tc": TrainConfig(),
        "storage": tmp_path,
        "num_workers": 1,
        "cpus_per_worker": 1.0,
        "use_gpu": False,
    }
    bad = {**ok, "run_name": "expert-bad", **override}
    # The feasible job would fail inside training (empty loop config) if it were started at all.
    with pytest.raises(RuntimeError, match=rf"expert-bad: needs .*{needle}"):
        fit_many([ok, bad], max_concurrent=2)


# -- autoscaler-aware feasibility (elrea_ray.resources) --------------------------------------------


def test_a_bundle_no_node_type_could_hold_is_impossible():
    from elrea_ray.resources import impossible

    head = [{"CPU": 0.0}]  # a fresh autoscaling cluster: the head offers nothing
    gpu_type = [{"resources": {"CPU": 8.0, "GPU": 1.0}, "max_count": 4}]
    assert impossible(4, {"CPU": 2.0, "GPU": 1.0}, head, gpu_type, "train") is None
    msg = impossible(1, {"CPU": 1.0, "GPU": 2.0}, head, gpu_type, "train")  # 2 GPUs on one node
    assert "single node" in msg and "GPU 1" in msg
    msg = impossible(5, {"CPU": 1.0, "GPU": 1.0}, head, gpu_type, "train")  # 5 GPUs, at most 4 nodes
    assert "needs 5 GPUs" in msg and "has 4 GPUs" in msg
    assert (
        impossible(1, {"CPU": 1.0, "GPU": 1.0}, head, [{"resources": {"CPU": 8.0}, "max_count": -1}], "train")
        is not None
    )  # no GPU node type at all


def test_unlimited_and_zero_count_node_types():
    from elrea_ray.resources import capacity, impossible

    types = [{"resources": {"CPU": 4.0}, "max_count": -1}, {"resources": {"CPU": 96.0}, "max_count": 0}]
    assert impossible(1000, {"CPU": 4.0}, [], types) is None
    assert "single node" in impossible(1, {"CPU": 8.0}, [], types)  # the 96-CPU type may never start
    total, shapes = capacity([{"CPU": 2.0}], [{"resources": {"CPU": 4.0}, "max_count": 3}])
    assert total == {"CPU": 14.0} and len(shapes) == 2


def test_without_an_autoscaler_the_live_nodes_are_all_there_is():
    from elrea_ray.resources import impossible

    live = [{"CPU": 4.0}, {"CPU": 2.0}]
    assert impossible(3, {"CPU": 2.0}, live, None) is None
    assert "needs 8 CPUs" in impossible(4, {"CPU": 2.0}, live, None, "experts")


def test_resource_wait_s_is_validated():
    with pytest.raises(ConfigError, match="ray.resource_wait_s"):
        load_config(SMOKE, ["ray.resource_wait_s=-1"])


def test_impossible_request_on_an_autoscaling_cluster_fails_at_once(ray_local):
    from elrea_ray.resources import check_resources

    types = [{"resources": {"CPU": 4.0, "GPU": 8.0}, "max_count": 2}]
    with pytest.raises(RuntimeError, match=r"stage experts .*64 GPU.*autoscaler node types: CPU 4, GPU 8 x2"):
        check_resources(
            1, {"CPU": 1.0, "GPU": 64.0}, "stage experts (Ray Train)", "experts", wait_s=600, node_types=types
        )


def test_a_stage_waits_a_bounded_time_for_nodes_it_asked_for(ray_local, capsys):
    from elrea_ray.resources import check_resources

    # A node type that could hold the request, but the local Ray has no autoscaler to start it.
    types = [{"resources": {"CPU": 64.0}, "max_count": 1}]
    with pytest.raises(RuntimeError, match=r"waited 2 s \(ray.resource_wait_s\)"):
        check_resources(
            1, {"CPU": 64.0}, "stage base (Ray Train)", "train", wait_s=2, report_every_s=1, node_types=types
        )
    out = capsys.readouterr().out
    assert "waiting up to 2 s for the autoscaler" in out


def _published_request() -> list[dict]:
    """What this driver asks Ray's autoscaler for, read back where `request_resources` writes it."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_concurrent_stages_ask_for_the_union_and_withdraw_when_done(ray_local):
    import threading
    import time

    from elrea_ray.resources import outstanding_demand, resources_for

    # Two experts that each need a 64-CPU node the local Ray lacks (a node type could hold them):
    # while both wait, the autoscaler is asked for both; when both give up, for nothing.
    types = [{"resources": {"CPU": 64.0}, "max_count": 4}]
    errors: list[Exception] = []

    def expert(cpus: float) -> None:
        try:
            with resources_for(
                1, {"CPU": cpus}, f"training expert-{cpus:g}", wait_s=6, report_every_s=10, node_types=types
            ):
                pass
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=expert, args=(c,)) for c in (48.0, 64.0)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(outstanding_demand()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    published = sorted(b["CPU"] for b in _published_request())
    for t in threads:
        t.join(30)
    assert published == [48.0, 64.0]
    assert len(errors) == 2 and all("waited 6 s" in str(e) for e in errors)
    assert outstanding_demand() == [] and _published_request() == []


def test_a_request_is_held_while_its_block_runs_and_withdrawn_after(ray_local):
    import ray

    from elrea_ray.resources import autoscaler_demand, outstanding_demand, resources_for

    # A request the live nodes already hold asks the autoscaler for nothing.
    have = ray.cluster_resources()["CPU"]
    with resources_for(1, {"CPU": have}, "training base", node_types=[{"resources": {"CPU": 64.0}, "max_count": 1}]):
        assert outstanding_demand() == []
    # A demand stays published for the whole block (the job placing its workers), then goes.
    with autoscaler_demand([{"CPU": 2.0}, {"CPU": 2.0}]):
        assert [b["CPU"] for b in _published_request()] == [2.0, 2.0]
    assert _published_request() == []
