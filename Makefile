# The two commands of the README. Both do all set-up on a fresh machine first.
.PHONY: setup demo test

setup:  ## the project with its test tools
	bash scripts/setup.sh

demo:  ## the embedded default: SmolLM2-135M-Instruct on reasoning-gym tasks, local Ray
	ELREA_EXTRAS= bash scripts/setup.sh
	HF_HUB_OFFLINE=1 .venv/bin/python jobs/full_pipeline.py

test: setup  ## lint, then every test tier (fast unit tests, the shared smoke run, slow and smollm2 tests)
	.venv/bin/ruff check elrea_ray serve_apps jobs benchmarks tests scripts
	.venv/bin/ruff format --check elrea_ray serve_apps jobs benchmarks tests scripts
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q
