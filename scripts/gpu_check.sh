#!/usr/bin/env bash
# On a machine with one NVIDIA GPU: a few bf16 training steps of the 125M and 1B presets,
# printing tokens/s and MFU per device (benchmark.py JSON lines).
#   bash scripts/gpu_check.sh [PEAK_TFLOPS]     # default 989 (H100/H200 dense bf16)
# Needs jax with CUDA (pip install "jax[cuda12]==0.10.2" in the venv); CPU-only jax refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${1:-989}
"$PY" -c "import jax, sys; d = jax.devices()[0]; print('device:', d.device_kind); sys.exit(d.platform != 'gpu')"
for size in 125m 1b; do
  echo "== $size"
  "$PY" scripts/benchmark.py --config="configs/pretrain_causal.py:$size" \
    --config.data.seq_len=2048 --config.data.batch_size=8 --config.model.remat=dots \
    --steps=10 --warmup=3 --peak_gflops=$((PEAK * 1000))
done
