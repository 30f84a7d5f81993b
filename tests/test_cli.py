"""The `elrea-ray` console script: every subcommand's argument handling, as a user runs it (a real
subprocess of the installed entry point, no Ray started unless the command needs it)."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elrea_ray.config import Config, load_config
from elrea_ray.pipeline import stage_keys

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
SCRIPT = Path(sys.executable).parent / "elrea-ray"


def cli(*args: str, script: list[str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = script or [str(SCRIPT)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_the_console_script_is_installed_and_its_help_lists_every_config_section():
    assert SCRIPT.is_file(), "pip install -e . should install the elrea-ray console script"
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("run", "sweep", "report", "serve", "validate-config"):
        assert command in out.stdout
    for section in dataclasses.fields(Config):
        assert f"  {section.name}: " in out.stdout, section.name
    run_help = cli("run", "--help").stdout
    assert "--run-dir" in run_help and "experts: lr" in run_help
    assert "--sweep-dir" in cli("sweep", "--help").stdout


def test_bad_arguments_exit_2_naming_the_argument():
    out = cli("frobnicate")
    assert out.returncode == 2 and "frobnicate" in out.stderr
    out = cli("run", "--config", str(SMOKE), "--epochs", "3")
    assert out.returncode == 2 and "--epochs" in out.stderr
    out = cli("validate-config", "--config", str(SMOKE), "experts.lrr=1e-4")
    assert out.returncode == 2 and "lrr" in out.stderr and "Traceback" not in out.stderr
    out = cli("validate-config", "--config", str(ROOT / "no-such.yaml"))
    assert out.returncode == 2 and "no-such.yaml" in out.stderr


def test_validate_config_prints_the_resolved_config_and_the_same_stage_keys_as_the_library():
    out = cli("validate-config", "--config", str(SMOKE), "experts.lr=3e-4")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0003" in out.stdout
    keys = stage_keys(load_config(SMOKE, ["experts.lr=3e-4"]))
    assert "# stage keys: " + ", ".join(f"{k}={v}" for k, v in keys.items()) in out.stdout


def test_the_job_scripts_are_the_same_commands():
    # jobs/full_pipeline.py is `elrea-ray run`: the same parser, so the same error for the same input
    script = cli(
        "--quiet", "--config", str(SMOKE), "bogus.x=1", script=[sys.executable, str(ROOT / "jobs" / "full_pipeline.py")]
    )
    console = cli("run", "--quiet", "--config", str(SMOKE), "bogus.x=1")
    assert script.returncode == console.returncode == 2
    assert script.stderr.split("error: ")[1] == console.stderr.split("error: ")[1]
    report = cli("--run-dir", str(ROOT / "no-such-run"), script=[sys.executable, str(ROOT / "jobs" / "report.py")])
    assert report.returncode == 2 and "metrics.json is missing" in report.stderr


# What each counted stage counts, as its progress lines say it.
COUNTED = {
    "base": "steps",
    "gradients": "examples featurised",
    "experts": "steps",
    "baselines": "steps",
    "eval": "items decoded",
}


@pytest.mark.slow
def test_run_prints_a_progress_line_per_stage_and_quiet_only_where_the_results_are(smoke_log, copy_of_smoke):
    """The shared smoke run ended every counted stage with a complete counter line; `elrea-ray
    run` on a copy whose eval stage is gone prints a line for every stage (up to date, or eval's
    own start, counter and end) and none of Ray's per-event output; with --quiet, only where the
    results are."""
    stages = list(stage_keys(load_config(SMOKE)))
    for stage, unit in COUNTED.items():
        if stage in stages:
            assert any(
                re.fullmatch(rf"\[{stage}\] (\d+)/\1 {unit} \(100%\)(, .*)?, \d+ s", line) for line in smoke_log
            ), (stage, smoke_log)
    run = ["run", "--config", str(SMOKE), "--run-dir", str(copy_of_smoke), "ray.address=local"]

    shutil.rmtree(copy_of_smoke / "eval")
    out = cli(*run, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for stage in stages[:-1]:
        assert f"[{stage}] up to date" in out.stdout, stage
    assert stages[-1] == "eval" and "[eval] running (key" in out.stdout and "[eval] done in" in out.stdout
    assert any(re.fullmatch(r"\[eval\] 16/16 items decoded \(100%\), \d+ s", line) for line in lines), lines
    # Ray Data's progress lines, and the lines Ray streams from workers: "(MapWorker(...) pid=123) ..."
    for ray_event in ("Running Dataset", "Total Progress", "Data sink", " pid="):
        assert ray_event not in out.stdout + out.stderr, ray_event
    assert (copy_of_smoke / "eval" / "results.md").is_file()

    shutil.rmtree(copy_of_smoke / "eval")
    quiet = cli(*run, "--quiet", timeout=900)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.splitlines() == [
        f"run directory: {copy_of_smoke}",
        f"  results: {copy_of_smoke / 'eval' / 'results.md'}",
        f"  bundle (for serving): {copy_of_smoke / 'bundle.json'}",
    ], quiet.stdout
    assert "[eval]" not in quiet.stderr and " INFO " not in quiet.stderr, quiet.stderr
    assert (copy_of_smoke / "eval" / "results.md").is_file()  # the eval stage did run


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "no-such-run"], "has no bundle.json"),
        (["serve", "no-such-run", "max_batch_size"], "must be key=value"),
        (["serve", "no-such-run", "batchsize=4"], "batchsize=4"),
        (["serve", "no-such-run", "api_key=s3cret"], "ELREA_API_KEY"),
        (["report", "no-such-run"], "metrics.json is missing"),
    ],
)
def test_serve_and_report_refuse_what_cannot_start(args, message):
    out = cli(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.slow
def test_serve_starts_the_app_for_a_run_directory(smoke_run):
    """`elrea-ray serve RUN` in its own process with its own local Ray answers /health and
    /v1/models; Ctrl-C stops it."""
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(SCRIPT), "serve", str(smoke_run.root), "num_cpus=0.5", "--port", str(port), "--address", "local"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, models = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert models is not None, f"no /health within 240 s; exit code {proc.poll()}"
        ids = [m["id"] for m in models["data"]]
        assert "base" in ids and any(i.startswith("elrea-") for i in ids), ids
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
