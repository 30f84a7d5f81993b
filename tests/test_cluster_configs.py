"""cluster_configs/: the `ray up` config and the KubeRay manifests parse, agree with each other and
with the project (Ray version, image, resources, entrypoint, Serve import path and arguments)."""

import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from elrea_ray.config import load_config
from elrea_ray.sweep import trial_demand

ROOT = Path(__file__).resolve().parents[1]
CC = ROOT / "cluster_configs"
KUBE = CC / "kuberay"
# where the image installs the project: the Dockerfile's WORKDIR
PROJECT_IN_IMAGE = next(
    line.split()[1] for line in (CC / "Dockerfile").read_text().splitlines() if line.startswith("WORKDIR")
)
SHARED = "/mnt/shared"


def _load(name):
    return yaml.safe_load((KUBE / name).read_text())


def _containers(cluster_spec):
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def _project_version():
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_ray_up_config_installs_the_project_on_a_gpu_cluster():
    c = yaml.safe_load((CC / "aws-gpu.yaml").read_text())
    assert c["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-") and "gpu" in c["docker"]["image"]
    nodes = c["available_node_types"]
    head = nodes[c["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no stage work on the head
    workers = [n for k, n in nodes.items() if k != c["head_node_type"]]
    assert workers and all(re.match(r"(g[4-6]|p[3-5])", n["node_config"]["InstanceType"]) for n in workers)
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])
    # the project is synced to a path that the setup commands pip-install
    target = next(k for k, v in c["file_mounts"].items() if v == ".")
    assert any("pip install" in cmd and target in cmd for cmd in c["setup_commands"])
    assert any("torch==" in cmd for cmd in c["setup_commands"])  # never an unpinned torch
    assert any("--head" in cmd and "--num-cpus=0" in cmd for cmd in c["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in cmd for cmd in c["worker_start_ray_commands"])
    assert any(f"{SHARED}:{SHARED}" in o for o in c["docker"]["run_options"])


def test_dockerfile_matches_ray_and_the_manifests_image():
    text = (CC / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$", text, re.M)
    assert f"WORKDIR {PROJECT_IN_IMAGE}" in text and "torch==" in text


@pytest.mark.parametrize(
    "name,kind,spec_key",
    [
        ("raycluster.yaml", "RayCluster", None),
        ("rayjob.yaml", "RayJob", "rayClusterSpec"),
        ("rayservice.yaml", "RayService", "rayClusterConfig"),
    ],
)
def test_kuberay_clusters_image_resources_and_storage(name, kind, spec_key):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = doc["spec"][spec_key] if spec_key else doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pvc = yaml.safe_load((KUBE / "shared-storage.yaml").read_text())
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    gpus = 0
    for group, c in _containers(spec):
        assert c["image"] == f"registry.example.com/elrea-ray:{_project_version()}"
        assert c["resources"]["requests"] == c["resources"]["limits"]  # Ray reads the limits
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        claims = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in group["template"]["spec"]["volumes"]
        }
        assert any(mounts[n] == SHARED and claims.get(n) == pvc["metadata"]["name"] for n in mounts)
        if group is not spec["headGroupSpec"]:
            per = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert per >= 1
            gpus += per * group["maxReplicas"]
    # the GPU profile's largest simultaneous request fits the worker group at full size
    paper = load_config(ROOT / "jobs" / "configs" / "paper.yaml")
    assert 1 <= trial_demand(paper)["GPU"] <= gpus


def test_rayjob_entrypoint_runs_the_pipeline_on_shared_storage():
    job = _load("rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{PROJECT_IN_IMAGE}/jobs/full_pipeline.py"
    assert (ROOT / Path(argv[1]).relative_to(PROJECT_IN_IMAGE)).is_file()
    config = Path(argv[argv.index("--config") + 1]).relative_to(PROJECT_IN_IMAGE)
    cfg = load_config(ROOT / config)
    assert cfg.run.run_dir.startswith(SHARED + "/") and cfg.train.use_gpu
    assert job["shutdownAfterJobFinishes"] is True  # KubeRay's default leaves the cluster running
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)


def test_rayservice_serves_the_real_app_with_valid_args():
    from serve_apps.elrea_app import AppArgs

    svc = _load("rayservice.yaml")["spec"]
    serve_cfg = yaml.safe_load(svc["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve_apps" / "serve_config.yaml").read_text())
    (app,), (local_app,) = serve_cfg["applications"], local["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["import_path"] == local_app["import_path"]
    assert set(app["args"]) == set(local_app["args"])  # kept in step with the local config file
    args = AppArgs(**app["args"])
    assert args.run_dir.startswith(SHARED + "/") and args.num_gpus >= 1
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # reachable through the Kubernetes service


def _gib(quantity: str) -> float:
    """A Kubernetes memory quantity (Gi / Mi / G) in GiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|G|M)", quantity)
    assert m, f"unexpected memory quantity {quantity!r}"
    scale = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}[m.group(2)]
    return float(m.group(1)) * scale


@pytest.mark.parametrize(
    "name,spec_key",
    [("raycluster.yaml", None), ("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")],
)
def test_kuberay_versions_secret_and_shared_memory(name, spec_key):
    text = (KUBE / name).read_text()
    doc = yaml.safe_load(text)
    spec = doc["spec"][spec_key] if spec_key else doc["spec"]
    # autoscalerOptions.version exists from KubeRay 1.4 on; the header must say so
    if "version" in spec.get("autoscalerOptions", {}):
        assert re.search(r"KubeRay >= 1\.([4-9]|\d\d)", text)
    assert f"Ray {spec['rayVersion']}" in text
    for group, c in _containers(spec):
        token = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
        assert len(token) == 1, f"{name}: {c['name']} has no HF_TOKEN"
        ref = token[0]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True and ref["name"] and ref["key"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        shm = vols[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        # a Memory emptyDir counts against the pod's limit: keep it well below it (<= 40%)
        assert _gib(shm["sizeLimit"]) <= 0.4 * _gib(c["resources"]["limits"]["memory"])


def test_ray_up_nodes_get_a_hugging_face_token_from_the_shared_disk():
    doc = yaml.safe_load((CC / "aws-gpu.yaml").read_text())
    opts = doc["docker"]["run_options"]
    token = [o for o in opts if "HF_TOKEN" in o]
    assert token == ["-e HF_TOKEN_PATH=/mnt/shared/hf-token"]
    # the token file lives on the file system every node mounts
    assert any(o.startswith("-v /mnt/shared:") for o in opts)


def test_ray_up_shm_is_below_node_memory_and_torch_is_cuda():
    text = (CC / "aws-gpu.yaml").read_text()
    c = yaml.safe_load(text)
    assert f"Ray {ray.__version__}" in text
    (shm,) = [o for o in c["docker"]["run_options"] if o.startswith("--shm-size")]
    size = float(re.fullmatch(r"--shm-size=(\d+)g", shm.split()[0]).group(1))
    node_gib = {"g5.xlarge": 16, "g5.2xlarge": 32, "m5.2xlarge": 32}  # AWS instance memory
    for node in c["available_node_types"].values():
        assert size <= 0.4 * node_gib[node["node_config"]["InstanceType"]]
    torch_cmds = [cmd for cmd in c["setup_commands"] if "torch==" in cmd]
    assert torch_cmds and all("download.pytorch.org/whl/cu" in cmd for cmd in torch_cmds)
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ \"torch==", (CC / "Dockerfile").read_text())
