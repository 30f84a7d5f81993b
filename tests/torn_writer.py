"""Subprocess for tests/test_artifacts.py: runs two stages on a run directory and dies
(os._exit, like SIGKILL: no clean-up, no finally) at the K-th file-system mutation; a text write
is cut in half and a folder deletion stopped half-way first, so torn files are left behind.

    python tests/torn_writer.py RUN_DIR K VERSION      # K=0: never die; prints the mutation count
"""

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elrea_ray.artifacts import RunDir  # noqa: E402

root, K, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count = 0


def _gate(fn, torn=False):
    def wrapped(*a, **kw):
        global count
        count += 1
        if count == K:
            if torn == "text":  # Path.write_text(self, data): leave half of it
                self, data = a[0], a[1]
                with open(self, "w") as f:
                    f.write(data[: len(data) // 2])
            elif torn == "tree":  # shutil.rmtree(folder): delete only the last half of its files
                files = sorted(p for p in Path(a[0]).rglob("*") if p.is_file())
                for p in files[len(files) // 2 :]:
                    os.remove(p)
            os._exit(137)
        return fn(*a, **kw)

    return wrapped


for mod, name in ((os, "replace"), (os, "rename"), (os, "link"), (os, "fsync")):
    setattr(mod, name, _gate(getattr(mod, name)))
shutil.rmtree = _gate(shutil.rmtree, torn="tree")
Path.unlink = _gate(Path.unlink)
Path.write_text = _gate(Path.write_text, torn="text")


def content(stage, key, i):
    return f"{stage}:{key}:{i}\n" * 200


def build(stage, key):
    def f(out):
        for i in range(3):
            (out / f"part-{i}.txt").write_text(content(stage, key, i))
        return {"parts": 3}

    return f


KEYS = {"v1": {"data": "d1", "clusters": "c1"}, "v2": {"data": "d1", "clusters": "c2"}}[version]
run = RunDir.at(root)
with run.lock():
    run.update_manifest(lambda m: m.update({"version": version}))
    for stage, key in KEYS.items():
        run.run_stage(stage, key, build(stage, key), log=lambda s: None)
print("mutations", count)
