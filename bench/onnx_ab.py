"""ONNX files side by side in one ONNX Runtime or OpenVINO process: interleaved runs, medians.

Usage (files from bench/onnx_export.py):
    .venv/bin/python bench/onnx_ab.py --batch 1 --rounds 40 bench/out/onnx/ours224-tiny.onnx \\
        bench/out/onnx/ours224fused-tiny.onnx bench/out/onnx/timm-tiny.onnx
    .venv/bin/python bench/onnx_ab.py --runtime openvino ...   # OpenVINO's CPU device, float32
Each file's input layout is read from its input shape (NHWC when the last axis is 3).
"""

import argparse
import time

import numpy as np
import onnxruntime


def load(path, runtime, threads, x, static=False):
    """A function that runs the file at PATH on X (NHWC, transposed for NCHW files).

    STATIC (OpenVINO only): fix the file's input to X's shape before compiling.
    """
    if runtime == "onnxruntime":
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        images = x if feed.shape[-1] == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return lambda: session.run(None, {feed.name: images})[0]
    import openvino

    core = openvino.Core()
    model = core.read_model(path)
    shape = model.input(0).get_partial_shape()
    last = shape[shape.rank.get_length() - 1]
    nhwc = last.is_static and last.get_length() == 3
    images = x if nhwc else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if static:
        model.reshape({model.input(0): openvino.PartialShape(list(images.shape))})
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda: np.array(request.infer({0: images})[compiled.output(0)])


def interleaved_times(runs, rounds):
    """Seconds per call of each function in RUNS (name -> function), called in turn for ROUNDS rounds."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    runs = {path: load(path, args.runtime, args.threads, x) for path in args.files}
    outputs = {path: run() for path, run in runs.items()}
    first = args.files[0]
    times = interleaved_times(runs, args.rounds)
    version = onnxruntime.__version__ if args.runtime == "onnxruntime" else __import__("openvino").__version__
    print(f"{args.runtime} {version}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    for path in args.files:
        difference = float(np.max(np.abs(outputs[path] - outputs[first])))
        print(f"  {path}: median {1000 * np.median(times[path]):7.1f} ms   "
              f"max |output - first file's| {difference:.1e}")


if __name__ == "__main__":
    main()
