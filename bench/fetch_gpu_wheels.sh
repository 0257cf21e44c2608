#!/usr/bin/env bash
# Downloads, here (with network), the wheels that bench/gpu.sh installs offline on a GPU
# machine whose Python 3.12 (x86_64) has PyTorch, timm and JAX but no Keras: keras and its
# small dependencies (keras' Requires-Dist: absl-py, numpy, rich, namex, h5py, optree,
# ml-dtypes, packaging; rich -> markdown-it-py, pygments; markdown-it-py -> mdurl;
# optree -> typing-extensions). numpy is not shipped: JAX and PyTorch bring their own.
# Versions are those of the project's .venv (keras 3.15.1). Output: .whl/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  keras==3.15.1
  absl-py==2.5.1
  namex==0.1.0
  optree==0.20.0
  ml-dtypes==0.6.0
  h5py==3.14.0
  rich==15.0.0
  markdown-it-py==4.3.0
  mdurl==0.1.2
  pygments==2.21.0
  packaging==26.4
  typing-extensions==4.16.0
)
mkdir -p .whl
for package in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$package"
done
ls -1 .whl
du -sh .whl
