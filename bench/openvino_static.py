"""OpenVINO on ONNX files compiled as written (dynamic shapes) and reshaped to one static shape.

With dynamic dimensions OpenVINO infers every node's shape on every run; a
deployment that serves one input size can fix it before compiling
(`model.reshape(...)`). One process, every file both ways, interleaved rounds, medians.

Usage (files from bench/onnx_export.py):
    .venv/bin/python bench/openvino_static.py --batch 1 --rounds 25 \\
        bench/out/onnx/ours224fused-tiny.onnx bench/out/onnx/oursfused-tiny.onnx bench/out/onnx/timm-tiny.onnx
Each file's input layout is read from its input shape (NHWC when the last axis is 3).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import openvino

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_ab import load  # noqa: E402  (one way to run a file in OpenVINO, layouts included)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    runs = {(path, static): load(path, "openvino", args.threads, x, static=static)
            for path in args.files for static in (False, True)}
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    print(f"openvino {openvino.__version__}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds")
    for path in args.files:
        dynamic, static = (1000 * statistics.median(times[(path, s)]) for s in (False, True))
        print(f"  {path}: as written {dynamic:6.1f} ms, static {static:6.1f} ms ({dynamic / static:.2f}x)")


if __name__ == "__main__":
    main()
