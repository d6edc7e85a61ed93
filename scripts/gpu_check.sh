#!/usr/bin/env bash
# Everything that needs a real GPU, in one script, for a GPU host as sandboxed ones often are: no
# network, no Docker, a python3 (3.11+) that already has JAX with a CUDA plugin (CUDA 12 or 13).
#   scripts/gpu_check.sh            (results land in $OUT, default ./gpu-check-results)
# It makes a venv that sees the system site-packages (so the system's JAX and CUDA wheels are
# the ones tested; a PYTHON that is a venv already is used as it is), installs envcheck with
# --no-deps, and adds the small pure wheels the system lacks (click, rich, msgspec, docker, isal,
# …) from ./.whl/ when present, else from the package index. Then it records: nvidia-smi, JAX's
# devices, `model.smoke --level medium` (every device: parity, generation, every attention
# implementation, matmul/memory/transfer against the datasheet, the all-reduce), `gpu-smoke
# --no-container --level medium --require-gpu`, the attention tests on the GPU backend (our
# Pallas kernel compiled by Triton), and bench_attention --gpu.
# Each step has a time limit; the whole run is kept under 8 minutes. Exit 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-results}
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/envcheck-gpu-venv}
mkdir -p "$OUT"
status=0
step() {  # step NAME LIMIT_S COMMAND...: run, tee to $OUT/NAME.txt, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  if ! timeout -k 10 "$limit" "$@" >"$OUT/$name.txt" 2>&1; then
    echo "=== $name FAILED (exit ${PIPESTATUS[0]})"; status=1
  fi
  tail -n 25 "$OUT/$name.txt"
  echo "=== $name: $((SECONDS - start)) s"
}
if ! "$PY" -c 'import jax' 2>/dev/null; then
  echo "no JAX in $PY: install jax[cuda12] (or jax[cuda13]) first, or set PYTHON"; exit 2
fi
if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  py="$PY"  # already a venv (its JAX is there): install into it
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || exit 2
  py="$VENV/bin/python"
fi
"$py" -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1 || {
  cat "$OUT/install.txt"; exit 2; }
missing=$("$py" - <<'EOF'
import importlib.util
wanted = {"click": "click", "rich": "rich", "msgspec": "msgspec", "docker": "docker",
          "isal": "isal", "backports.zstd": "backports.zstd", "yaml": "pyyaml",
          "requests": "requests", "packaging": "packaging", "safetensors": "safetensors",
          "flax": "flax", "pytest": "pytest", "pynvml": "nvidia-ml-py"}
def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(dist for module, dist in wanted.items() if not present(module)))
EOF
)
if [ -n "$missing" ]; then
  echo "=== installing what the system python lacks: $missing"
  if [ -d .whl ]; then
    "$py" -m pip install --quiet --no-index --find-links .whl $missing >>"$OUT/install.txt" 2>&1
  else
    "$py" -m pip install --quiet $missing >>"$OUT/install.txt" 2>&1
  fi || { echo "=== could not install: $missing (see $OUT/install.txt)"; status=1; }
fi
# the steps' limits add up to 460 s, so the whole run stays under 8 minutes with the set-up
step nvidia-smi 20 nvidia-smi
step jax-devices 40 "$py" -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices(), [d.device_kind for d in jax.devices()])'
step model-smoke 120 "$py" -m model.smoke --level medium --json
step gpu-smoke-host 120 "$py" -m envcheck gpu-smoke --no-container --level medium --require-gpu
step attention-tests 100 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_attention.py tests/unit/test_model_impls.py
step bench-attention 60 "$py" -m scripts.bench_attention --gpu --json "$OUT/bench_attention_gpu.json"
exit $status
