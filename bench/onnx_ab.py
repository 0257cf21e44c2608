"""ONNX files side by side in one ONNX Runtime process: interleaved runs, medians.

Usage (files from bench/onnx_export.py):
    .venv/bin/python bench/onnx_ab.py --batch 1 --rounds 40 bench/out/onnx/ours224-tiny.onnx \\
        bench/out/onnx/ours224fused-tiny.onnx bench/out/onnx/timm-tiny.onnx
Each file's input layout is read from its input shape (NHWC when the last axis is 3).
"""

import argparse
import time

import numpy as np
import onnxruntime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    runs = {}
    for path in args.files:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        images = x if feed.shape[-1] == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        runs[path] = (session, {feed.name: images})
    outputs = {path: session.run(None, feed)[0] for path, (session, feed) in runs.items()}
    first = args.files[0]
    times = {path: [] for path in args.files}
    for _ in range(args.rounds):
        for path, (session, feed) in runs.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[path].append(time.perf_counter() - start)
    print(f"onnxruntime {onnxruntime.__version__}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    for path in args.files:
        difference = float(np.max(np.abs(outputs[path] - outputs[first])))
        print(f"  {path}: median {1000 * np.median(times[path]):7.1f} ms   "
              f"max |output - first file's| {difference:.1e}")


if __name__ == "__main__":
    main()
