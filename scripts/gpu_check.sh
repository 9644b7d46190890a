#!/usr/bin/env bash
# On a machine with one NVIDIA GPU: the memory preflight of the 125M and 1B presets on it, then a few
# bf16 training steps of each, printing tokens/s and MFU per device (benchmark.py JSON lines).
#   bash scripts/gpu_check.sh [PEAK_TFLOPS] [DEVICE]    # defaults: 989 (H100/H200 dense bf16), h200
# Needs jax with CUDA (pip install "jax[cuda12]==0.10.2" in the venv); CPU-only jax refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${1:-989}
DEVICE=${2:-h200}
"$PY" -c "import jax, sys; d = jax.devices()[0]; print('device:', d.device_kind); sys.exit(d.platform != 'gpu')"
for size in 125m 1b; do
  echo "== $size"
  # one device: the preset's `local` target (the whole mesh on this GPU), 8 x 2048 tokens per step
  ARGS=(--config="configs/llama_$size.py:local" --config.data.batch_size=8 --config.optim.grad_accum_steps=1
        --config.model.remat=dots)
  "$PY" scripts/estimate_memory.py "${ARGS[@]}" --devices=1 --device="$DEVICE" || true
  "$PY" scripts/benchmark.py "${ARGS[@]}" --steps=10 --warmup=3 --peak_gflops=$((PEAK * 1000))
done
