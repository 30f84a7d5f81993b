"""An s3:// run directory, against moto's S3 server started here (a real HTTP S3 API on a free
port; pyarrow talks to it as to any S3-compatible store)."""

import logging
import shutil
import socket
import time
import uuid

import pyarrow.fs as pafs
import pytest

from elrea_ray import storage
from elrea_ray.artifacts import MARKER, STAGES, ArtifactError, RunDir

moto_server = pytest.importorskip("moto.server")  # in the test extra (pyproject.toml)


@pytest.fixture(scope="module")
def s3():
    """The base URI of a fresh moto S3 server: s3://KEY:SECRET@<bucket>/...?endpoint... is built
    by `uri()`. Credentials and endpoint travel in the URI, so Ray workers need no env."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def uri(endpoint: str, bucket: str, path: str = "") -> str:
    return f"s3://testing:testing@{bucket}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.fixture
def bucket(s3):
    name = f"b-{uuid.uuid4().hex[:8]}"
    pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        endpoint_override=s3,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(name)
    return name


@pytest.fixture
def object_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELREA_CACHE", str(tmp_path / "cache"))
    return storage.cache_root()


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stage(folder, key, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / MARKER).write_text(key)
    return folder


def test_push_pull_round_trip_marker_last(s3, bucket, tmp_path, monkeypatch):
    src = _stage(tmp_path / "src", "k1", {"a.txt": "a", "sub/b.bin": "b" * 5000, "sub/deep/c": "c"})
    order = []
    copy = pafs.copy_files

    def recording(source, destination, **kw):
        order.append(destination)
        return copy(source, destination, **kw)

    monkeypatch.setattr(pafs, "copy_files", recording)
    remote = uri(s3, bucket, "run/stage")
    storage.push_dir(src, remote)
    assert order[-1].endswith("/" + MARKER) and len(order) == 4  # the marker after every file
    monkeypatch.undo()

    dst = tmp_path / "dst"
    assert storage.pull_dir(remote, dst) == 4
    assert _tree(dst) == _tree(src)
    assert storage.pull_dir(remote, dst, merge=True) == 0  # nothing new to fetch
    assert storage.exists(storage.join(remote, "sub", "deep", "c"))
    storage.delete_dir(remote)
    assert not storage.exists(remote)


def test_localize_caches_by_marker_and_never_unmarked(s3, bucket, tmp_path, object_cache):
    remote = uri(s3, bucket, "run/adapters/experts")
    storage.push_dir(_stage(tmp_path / "v1", "key-1", {"expert-00/w": "one"}), remote)
    ref = storage.join(remote, "expert-00")  # a folder inside the marked stage folder
    got = storage.localize(ref)
    assert (got / "w").read_text() == "one"
    stamp = (got / "w").stat().st_ino
    assert storage.localize(ref).joinpath("w").stat().st_ino == stamp  # reused, not fetched again

    # The stage is rebuilt with another key: the cached copy no longer counts.
    storage.delete_dir(remote)
    storage.push_dir(_stage(tmp_path / "v2", "key-2", {"expert-00/w": "two"}), remote)
    assert (storage.localize(ref) / "w").read_text() == "two"

    # No marker anywhere above it: refused, and nothing is cached for it.
    loose = uri(s3, bucket, "loose/folder")
    fs, path = storage.filesystem(loose)
    with fs.open_output_stream(f"{path}/x") as f:
        f.write(b"x")
    before = set(object_cache.iterdir())
    with pytest.raises(ArtifactError, match="no _COMPLETE marker"):
        storage.localize(loose)
    assert set(object_cache.iterdir()) == before

    assert storage.localize(str(tmp_path / "v1")) == tmp_path / "v1"  # local paths pass through


def test_pull_drops_local_stage_without_remote_marker(s3, bucket, tmp_path):
    run = RunDir.at(uri(s3, bucket, "run"), tmp_path / "mirror")
    _stage(run.stage_dir("data"), "kd", {"train.parquet": "t"})
    _stage(run.stage_dir("clusters"), "kc", {"report.json": "{}"})
    run._push_stage(run.stage_dir("data"))  # only data reached the object store
    shutil.rmtree(run.stage_dir("data"))
    logs = []
    run.pull(log=logs.append)
    assert run.completed_key("data") == "kd" and (run.data_file("train")).read_text() == "t"
    assert not run.stage_dir("clusters").exists(), logs


def test_endpoint_and_credentials_from_the_environment(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    run = RunDir.at(f"s3://{bucket}/run", tmp_path / "mirror")
    storage.write_text(run.ref(run.manifest), "{}")
    assert storage.read_text(uri(s3, bucket, "run/manifest.json")) == "{}"  # the same object


def test_bad_object_store_uris_fail_fast_naming_the_uri(s3, tmp_path):
    with pytest.raises(ArtifactError, match=r"s3://.*no-such-bucket.*bucket 'no-such-bucket' does not exist"):
        RunDir.at(uri(s3, "no-such-bucket", "run"), tmp_path / "m")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    t0 = time.time()
    unreachable = r"run directory s3://bkt/run\?endpoint_override=127.0.0.1.* is not reachable"
    with pytest.raises(ArtifactError, match=unreachable):
        RunDir.at(uri(closed, "bkt", "run"), tmp_path / "m")
    print(f"unreachable endpoint refused in {time.time() - t0:.1f} s")
    with pytest.raises(ArtifactError, match="unknown query parameter"):
        RunDir.at(uri(s3, "bkt", "run") + "&colour=blue")


def test_config_rejects_other_schemes_and_a_stray_local_dir():
    from elrea_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="run.run_dir must be a local path or an s3:// URI"):
        load_config(None, ["run.run_dir=gs://bucket/run"])
    with pytest.raises(ConfigError, match="run.local_dir must be unset"):
        load_config(None, ["run.run_dir=runs/x", "run.local_dir=/mnt/m"])
    assert load_config(None, ["run.run_dir=s3://b/run", "run.local_dir=/mnt/m"]).run.local_dir == "/mnt/m"


@pytest.fixture
def worker_cache():
    """Ray workers localize into $ELREA_CACHE/objects (the session's cache): remove what this
    test's (random-bucket, random-port) URIs added there."""
    root = storage.cache_root()
    before = set(root.iterdir()) if root.exists() else set()
    yield lambda: set(root.iterdir()) - before  # entries added so far
    for entry in (set(root.iterdir()) if root.exists() else set()) - before:
        shutil.rmtree(entry, ignore_errors=True)


def _ran(logs):
    return sorted({line.split("]")[0][1:] for line in logs if "] running (key" in line})


@pytest.mark.slow
def test_pipeline_on_s3_resumes_from_the_object_store(ray_local, s3, bucket, tmp_path, worker_cache):
    """One smoke run into s3://, a rerun from an empty mirror (nothing rebuilt), then a changed
    expert setting (only experts and eval rerun)."""
    from conftest import smoke_config

    from elrea_ray.pipeline import run_pipeline, stage_keys

    remote, mirror = uri(s3, bucket, "run"), tmp_path / "mirror"
    cfg = smoke_config(remote, f"run.local_dir={mirror}")
    logs = []
    t0 = time.time()
    run = run_pipeline(cfg, log=logs.append)
    print(f"s3 smoke run: {time.time() - t0:.0f} s")
    assert run.root == mirror and _ran(logs) == sorted([*STAGES, "baselines"])  # base_continued by default
    keys = stage_keys(cfg)
    for stage in STAGES:
        assert run.remote_key(stage) == keys[stage], stage
    for name in (
        "manifest.json",
        "bundle.json",
        "config.yaml",
        "eval/metrics.json",
        "eval/report.html",
        "adapters/experts/expert-00/adapter_config.json",
        "adapters/base/epoch-2/adam_state.safetensors",
    ):
        assert storage.exists(storage.join(remote, name)), name
    fs, path = storage.filesystem(remote)
    names = sorted(
        i.path[len(path) + 1 :]
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File
    )
    assert not [n for n in names if ".partial" in n or ".writing" in n], "partials left behind"
    assert any(n.startswith("ray/base-") for n in names)  # Ray Train checkpointed into S3 too
    assert "run.lock" not in names  # the advisory lock is released
    local_files = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert local_files == [n for n in names if not n.startswith("ray/")]  # the mirror is exact

    shutil.rmtree(mirror)  # a fresh machine: everything must come from the object store
    logs = []
    run_pipeline(cfg, log=logs.append)
    assert _ran(logs) == [], logs
    assert all(any(f"[{s}] up to date" in line for line in logs) for s in STAGES), logs

    logs = []
    t0 = time.time()
    run_pipeline(smoke_config(remote, f"run.local_dir={mirror}", "experts.lr=2.0e-3"), log=logs.append)
    print(f"s3 rerun after experts.lr changed: {time.time() - t0:.0f} s")
    assert _ran(logs) == ["baselines", "eval", "experts"], logs  # base_continued follows the experts
    assert worker_cache()  # the tasks read through the node-local cache
