#!/usr/bin/env bash
# Everything that needs a real GPU, in one script. Run from anywhere on a GPU host:
#   scripts/gpu_check.sh            (results land in $OUT, default ./gpu-check-results)
# It sets up its own venv with jax[cuda12] + the test extra, then records: nvidia-smi, JAX's
# devices, the model smoke (every attention implementation, cuDNN in bf16 included), the
# attention tests on the GPU backend (our Pallas kernel compiled by Triton, not interpreted),
# `envcheck gpu-smoke --require-gpu` (host chain with NVML through nvidia-ml-py and the model on
# the host GPU; then the container chain when a Docker Engine has the image), and the GPU
# attention benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-gpu-check-results}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, tee its output to $OUT/NAME.txt, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  if ! "$@" 2>&1 | tee "$OUT/$name.txt"; then echo "=== $name FAILED"; status=1; fi
}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet -e '.[cuda12,test]' || exit 2
fi
py="$VENV/bin/python"
step nvidia-smi nvidia-smi
step jax-devices "$py" -c 'import jax; print(jax.default_backend(), jax.devices())'
step model-smoke "$py" -m model.smoke
step attention-tests "$py" -m pytest -q tests/unit/test_attention.py tests/unit/test_model_impls.py
step gpu-smoke-host "$VENV/bin/envcheck" gpu-smoke --no-container --require-gpu --json
if docker image inspect "${IMAGE:-envcheck-dev:latest}" >/dev/null 2>&1; then
  step gpu-smoke-container "$VENV/bin/envcheck" gpu-smoke --image "${IMAGE:-envcheck-dev:latest}" \
    --require-gpu
else
  echo "=== gpu-smoke-container skipped: no Docker Engine with ${IMAGE:-envcheck-dev:latest}" \
    "(envcheck build makes it)"
fi
step bench-attention "$py" -m scripts.bench_attention --gpu --json "$OUT/bench_attention_gpu.json"
exit $status
