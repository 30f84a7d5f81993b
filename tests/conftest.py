"""Shared fixtures: a model cache in a temp folder, one local Ray, and ONE smoke pipeline run per
test session that the integration tests only read."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"

# Keep the test suite offline and quiet; set before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """Built-in models live in the user's cache (~/.cache/elrea-ray or $ELREA_CACHE), where
    scripts/setup.sh already converted SmolLM2; the tiny model is built there in a second."""
    from elrea_ray.model import cache_dir

    os.environ["ELREA_CACHE"] = str(cache_dir())
    return cache_dir()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    "ELREA_CACHE": os.environ["ELREA_CACHE"],
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                }
            },
        )
    yield ray
    ray.shutdown()


def smoke_config(run_dir, *overrides):
    from elrea_ray.config import load_config

    return load_config(SMOKE, [f"run.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="session")
def smoke_log() -> list[str]:
    """The lines the shared smoke run printed (its stage and progress lines)."""
    return []


@pytest.fixture(scope="session")
def smoke_run(ray_local, tmp_path_factory, smoke_log):
    """The one shared smoke run (about two minutes on 2 cores)."""
    from elrea_ray.pipeline import run_pipeline

    def log(line: str) -> None:
        print(line)
        smoke_log.append(line)

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    return run_pipeline(smoke_config(run_dir), log=log)


@pytest.fixture
def copy_of_smoke(smoke_run, tmp_path):
    """A private copy of the shared smoke run, for tests that rerun stages in it."""
    dst = tmp_path / "run"
    shutil.copytree(smoke_run.root, dst, ignore=shutil.ignore_patterns("ray"))
    return dst
