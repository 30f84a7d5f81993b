"""The repository speaks only of itself: no machine paths, a README a user can read, links that
resolve."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths of particular machines, and fixed defaults under /tmp. /home/ray is the home
# of the rayproject images, where the cluster manifests install the project.
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|root|home/(?!ray/)\w+)/|(?<![\w.])/tmp/(?!\$)[\w.-]")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / f for f in out.splitlines()]
    return [
        f
        for f in files
        if f.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ""}
        and f.is_file()
        and f.name != "test_repository.py"
    ]


def test_no_file_names_a_machine_path():
    hits = []
    for f in tracked_text_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_pattern_catches_machine_paths():
    # built from parts, so this file does not itself hold the paths it looks for
    for bad in (
        "/".join(["", "work", "main", "runs"]),
        'default="/' + 'root/x"',
        "OUT=/" + "tmp/out",
        "/".join(["", "home", "alice", "data"]),
    ):
        assert MACHINE_PATH.search(bad), bad
    for fine in (
        "runs/default",
        "s3://b/run",
        "$TMPDIR/x",
        "docs/method.md",
        "/mnt/shared/runs",
        "/home/ray/elrea-ray",
    ):
        assert not MACHINE_PATH.search(fine), fine


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_no_file_points_at_design_notes_outside_the_repository():
    # the design notes and the research notes beside them (notes/<topic>.md) live outside the repository
    outside = re.compile(r"\b(DESIGN|STYLE)\.md\b|(?<![\w/.])notes/[\w.-]+\.md\b")
    hits = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in tracked_text_files()
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits
