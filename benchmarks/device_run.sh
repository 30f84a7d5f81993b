#!/usr/bin/env bash
# The GPU run, prepared for a machine that has torch, transformers and peft but no Ray, no
# bitsandbytes, no weights and no network (the device lent to some sessions). A few minutes:
#   1. gradient features (benchmarks/gradient_features.py) on random:smollm2-135m, bf16
#   2. the same on random:gemma-2b (2.5 B parameters, gemma-1.1-2b-it's architecture), bf16
#   3. routed-ensemble decoding (benchmarks/ensemble_decode.py) on random:smollm2-135m, bf16
# Random weights cost what the real ones cost in compute and memory (elrea_ray.model.RANDOM_SHAPES);
# the tokenizer is the tiny model's, so the generated prompts are ~80 tokens (~50 with SmolLM2's).
# Each step's output goes to $OUT/<step>.log (default ./device-out); a failed step does not stop
# the next.
#
#     OUT=device-out bash benchmarks/device_run.sh          # on the GPU machine
#     DEVICE=cpu QUICK=1 bash benchmarks/device_run.sh      # a dry run of the same steps on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ELREA_CACHE=${ELREA_CACHE:-$HOME/.cache/elrea-ray}  # the random models (5 GB for gemma-2b): not in $OUT
PY=${PYTHON:-python}
if [ -n "${QUICK:-}" ]; then  # the CPU dry run: every step, a few examples each
  SMALL=(--examples 4 --less-examples 1 --rounds 1 --less-buffer 2 --batch-size 4 --d-proj 1024)
  BIG=("${SMALL[@]}") DECODE=(--batch-sizes 2 --new-tokens 2 --repeats 1 --adapters 3 --no-memory)
  GEMMA=(--model random:smollm2-135m)  # the 2.5 B build is too slow for a dry run on 2 cores
else
  SMALL=(--examples 128 --batch-size 16 --less-examples 8 --rounds 3)
  BIG=(--examples 64 --batch-size 8 --less-examples 4 --rounds 3)
  DECODE=(--batch-sizes 1 8 32 --new-tokens 32 --repeats 3)
  GEMMA=(--model random:gemma-2b)
fi
BF16=(--bf16); [ "$DEVICE" = cpu ] && BF16=()

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}

$PY - <<'PY' 2>&1 | tee "$OUT/env.log"
import platform, torch, transformers, peft
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
step gradients-smollm2 240 $PY benchmarks/gradient_features.py --model random:smollm2-135m \
  --device "$DEVICE" --data generated "${BF16[@]}" "${SMALL[@]}"
step gradients-gemma2b 300 $PY benchmarks/gradient_features.py "${GEMMA[@]}" \
  --device "$DEVICE" --data generated "${BF16[@]}" "${BIG[@]}"
step decode-smollm2 180 $PY benchmarks/ensemble_decode.py --model random:smollm2-135m \
  --device "$DEVICE" --dtype "$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)" "${DECODE[@]}"
