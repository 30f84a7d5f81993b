"""Object-store run directories (`s3://bucket/prefix`) through pyarrow filesystems.

The remote URI is the durable record; every process works on a local copy, as Ray Train does
with its `storage_path`. The driver keeps a mirror of the whole run (`RunDir`), and a Ray task
that reads an artifact gets its URI and calls `localize()`, which downloads it once per node into
a cache keyed by the stage's `_COMPLETE` marker. Local paths pass through every function here
unchanged, so a run on a local or shared filesystem does exactly what it did before.

Endpoints and credentials (checked with pyarrow 26):
  - `s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=us-east-1` names an
    S3-compatible server (MinIO, Ceph, moto) in the URI itself, so every node that gets a URI
    also gets its endpoint; without `endpoint_override`, `AWS_ENDPOINT_URL_S3` or
    `AWS_ENDPOINT_URL` (e.g. `http://minio:9000`) is used, which then must be set on every node
    (a Ray `runtime_env` env var does that).
  - Credentials come from pyarrow's usual AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
    `~/.aws`, instance roles). `s3://KEY:SECRET@bucket/...` also works, but the URI is written to
    manifest.json and config.yaml, so keep real secrets out of it.
Only `s3://` is built here with our timeouts; other schemes go to `FileSystem.from_uri` as is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from elrea_ray.markers import MARKER, ArtifactError

_S3_QUERY = {"endpoint_override", "scheme", "region"}
_THREADS = 8  # parallel object transfers; S3 latency, not bandwidth, bounds small files


def is_remote(s: str | os.PathLike) -> bool:
    """True for an object-store URI (`s3://...`); False for local paths and `file://`."""
    s = str(s)
    return "://" in s and not s.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path; credentials and query (the endpoint) are kept."""
    u = urlsplit(uri)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts if p and p != ".")])
    return urlunsplit((u.scheme, u.netloc, path, u.query, ""))


def redact(uri: str) -> str:
    """The URI without user-info credentials, for messages and cache names."""
    u = urlsplit(uri)
    host = u.netloc.rsplit("@", 1)[-1]
    return urlunsplit((u.scheme, host, u.path, u.query, ""))


def _s3(uri: str, fast: bool) -> tuple[pafs.FileSystem, str]:
    u = urlsplit(uri)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = sorted(set(q) - _S3_QUERY)
    if unknown:
        raise ArtifactError(
            f"run directory {redact(uri)}: unknown query parameter(s) {unknown}; allowed: {sorted(_S3_QUERY)}"
        )
    creds, _, bucket = u.netloc.rpartition("@")
    kw: dict = {k: q[k] for k in ("endpoint_override", "scheme", "region") if k in q}
    env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "endpoint_override" not in kw and env:
        # FileSystem.from_uri reads this variable but the S3FileSystem constructor does not
        # (pyarrow 26), so it is applied here: http://host:port -> scheme + endpoint_override.
        e = urlsplit(env if "://" in env else f"https://{env}")
        kw.setdefault("scheme", e.scheme)
        kw["endpoint_override"] = e.netloc
    if creds:
        key, _, secret = creds.partition(":")
        kw.update(access_key=unquote(key), secret_key=unquote(secret))
    # Fail in seconds on an unreachable endpoint when validating (the default policy retries
    # for about a minute on a black-holed host); normal transfers keep pyarrow's retries.
    if fast:
        kw.update(connect_timeout=2, request_timeout=5, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    return pafs.S3FileSystem(**kw), f"{bucket}{u.path}".rstrip("/")


def filesystem(uri: str, fast: bool = False) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a URI or a local path."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    if uri.startswith("s3://"):
        return _s3(uri, fast)
    return pafs.FileSystem.from_uri(uri)


def check(uri: str) -> None:
    """An ArtifactError naming the URI now, instead of a stage failing later: the endpoint must
    answer and the bucket must exist."""
    fs, path = filesystem(uri, fast=True)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise ArtifactError(f"run directory {redact(uri)} is not reachable: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise ArtifactError(
            f"run directory {redact(uri)}: bucket {bucket!r} does not exist on that endpoint; create it first"
        ) from None


def _info(uri: str):
    fs, path = filesystem(uri)
    return fs, path, fs.get_file_info(path)


def exists(uri: str) -> bool:
    return _info(uri)[2].type != pafs.FileType.NotFound


def read_text(uri: str) -> str | None:
    """The object's text, or None when it does not exist."""
    fs, path, info = _info(uri)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:  # one PUT: readers see the old object or the new one
        f.write(text.encode())


def delete(uri: str) -> None:
    """Delete one object (nothing if absent)."""
    fs, path, info = _info(uri)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    """Delete everything under the URI (nothing if absent)."""
    fs, path, info = _info(uri)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def push_file(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def pull_file(uri: str, local: Path) -> None:
    fs, path = filesystem(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def push_dir(local: Path, uri: str, last: str = MARKER) -> None:
    """Upload every file under `local` to `uri`; files named `last` go after all others, so a
    reader that sees the marker also sees every file beside it."""
    fs, path = filesystem(uri)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    first = [p for p in files if p.name != last]
    final = [p for p in files if p.name == last]

    def put(p: Path) -> None:
        pafs.copy_files(
            str(p),
            f"{path}/{p.relative_to(local).as_posix()}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )

    for group in (first, final):
        with ThreadPoolExecutor(_THREADS) as ex:
            list(ex.map(put, group))


def _remote_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [i for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]


def pull_dir(uri: str, local: Path, merge: bool = False) -> int:
    """Download the folder at `uri`; returns the number of files fetched.

    merge=False: `local` becomes a copy of it (built beside, then renamed over the old folder,
    so a kill mid-download never leaves a marker beside missing files). merge=True: files are
    added into `local`, skipping those already there with the same size (a `.partial` folder
    collecting what tasks wrote)."""
    fs, path = filesystem(uri)
    local = Path(local)
    files = _remote_files(fs, path)
    dest = local if merge else local.with_name(f".{local.name}.pulling-{uuid.uuid4().hex[:8]}")
    todo = []
    for info in files:
        target = dest / info.path[len(path) :].lstrip("/")
        if merge and target.exists() and target.stat().st_size == info.size:
            continue
        todo.append((info.path, target))

    def get(item) -> None:
        src, target = item
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(_THREADS) as ex:
        list(ex.map(get, todo))
    if not merge:
        _swap_into(dest, local)
    return len(todo)


def _swap_into(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


# -- the node-local cache that Ray tasks read through --------------------------------------------


def cache_root() -> Path:
    """$ELREA_CACHE/objects (default ~/.cache/elrea-ray/objects): one folder per localized URI."""
    return Path(os.environ.get("ELREA_CACHE", Path.home() / ".cache" / "elrea-ray")) / "objects"


def marker_key(uri: str) -> str | None:
    """The `_COMPLETE` key of the stage folder holding `uri` (the URI itself or the nearest
    parent folder with a marker), or None if no folder up to the bucket is marked."""
    fs, path = filesystem(uri)
    parts = path.split("/")
    for n in range(len(parts), 1, -1):
        info = fs.get_file_info("/".join(parts[:n]) + "/" + MARKER)
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                return f.read().decode().strip()
    return None


def localize(ref: str) -> Path:
    """A local path holding the file or folder `ref` names (a local path is returned as is).

    Remote artifacts are downloaded into a fresh folder of the node's cache and renamed into
    place; a cached copy is reused only while it holds the same marker key as the remote stage,
    so a rebuilt stage is fetched again and an unmarked (incomplete) folder is never cached."""
    if not is_remote(ref):
        return Path(ref)
    key = marker_key(ref)
    if key is None:
        raise ArtifactError(
            f"{redact(ref)} is not inside a finished stage (no {MARKER} marker in it "
            "or a parent folder); rerun the pipeline to complete that stage"
        )
    fs, path = filesystem(ref)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    entry = cache_root() / hashlib.sha256(redact(ref).encode()).hexdigest()[:16]
    if (entry / "KEY").is_file() and (entry / "KEY").read_text() == key and (entry / name).exists():
        return entry / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        pull_file(ref, tmp / name)
    elif info.type == pafs.FileType.Directory:
        pull_dir(ref, tmp / name, merge=True)
    else:
        shutil.rmtree(tmp)
        raise ArtifactError(f"{redact(ref)} does not exist (its stage marker says {key})")
    (tmp / "KEY").write_text(key)
    try:
        _swap_into(tmp, entry)
    except OSError:  # another process on this node filled the entry in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not ((entry / "KEY").is_file() and (entry / "KEY").read_text() == key):
            raise
    return entry / name


def for_ray_data(ref: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for `ray.data.read_parquet`/`write_parquet`: read tasks on any node
    reach the object store directly; a local path gets Ray's default filesystem."""
    if not is_remote(ref):
        return ref, None
    fs, path = filesystem(ref)
    return path, fs
