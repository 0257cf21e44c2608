#!/usr/bin/env bash
# The whole GPU comparison in one invocation (see bench/gpu.py): GCViT-Tiny on Keras 3 + JAX
# (float32 and mixed_bfloat16, jax.jit) against timm (eager fp32, TF32, autocast bf16,
# torch.compile + autocast bf16) on the same GPU, batch 128, interleaved rounds.
#
# The GPU machine's Python has PyTorch, timm and JAX but no Keras: Keras and its small
# dependencies are installed offline from .whl/ (made by bench/fetch_gpu_wheels.sh), only
# those the machine lacks, so that nothing shadows the versions JAX and PyTorch were built with.
#
# Usage: bash bench/gpu.sh            (GCVIT_BENCH_* variables: see bench/gpu.py)
# Test without a GPU: GCVIT_BENCH_DEVICE=cpu GCVIT_BENCH_BATCH=2 GCVIT_BENCH_ROUNDS=2 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GCVIT_SITE:-/tmp/site}

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in .whl/; run bench/fetch_gpu_wheels.sh first (and carry .whl)" >&2
  exit 1
fi
# Keras always comes from .whl; a dependency only where the machine has none.
mapfile -t WHEELS < <("$PYTHON" - <<'PY'
import glob, importlib.metadata as metadata, os
for path in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(path).split("-")[0]
    try:
        metadata.version(name)
        if name.lower() == "keras":
            print(path)
    except metadata.PackageNotFoundError:
        print(path)
PY
)
mkdir -p "$SITE"
echo "installing into $SITE: ${WHEELS[*]##*/}"
"$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${WHEELS[@]}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# No TensorFlow there: Keras must not default to it.
export KERAS_BACKEND=jax
"$PYTHON" -c "import keras, jax, torch, timm; print('keras', keras.__version__, keras.__file__); print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
exec "$PYTHON" bench/gpu.py
