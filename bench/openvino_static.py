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
import statistics
import time

import numpy as np
import openvino


def compile_file(core, path, static, batch, threads):
    """(infer request, input array) for the file at PATH, reshaped to a static shape if STATIC."""
    model = core.read_model(path)
    shape = model.input(0).get_partial_shape()
    nhwc = shape[3].is_static and shape[3].get_length() == 3
    static_shape = [batch, 224, 224, 3] if nhwc else [batch, 3, 224, 224]
    if static:
        model.reshape({model.input(0): openvino.PartialShape(static_shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3), dtype=np.float32)
    return compiled.create_infer_request(), x if nhwc else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    core = openvino.Core()
    runs = {(path, static): compile_file(core, path, static, args.batch, args.threads)
            for path in args.files for static in (False, True)}
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (request, x) in runs.items():
            start = time.perf_counter()
            request.infer({0: x})
            times[key].append(time.perf_counter() - start)
    print(f"openvino {openvino.__version__}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds")
    for path in args.files:
        dynamic, static = (1000 * statistics.median(times[(path, s)]) for s in (False, True))
        print(f"  {path}: as written {dynamic:6.1f} ms, static {static:6.1f} ms ({dynamic / static:.2f}x)")


if __name__ == "__main__":
    main()
