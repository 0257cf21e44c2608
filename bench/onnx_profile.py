"""Kernel time per operator type of ONNX files, from ONNX Runtime's or OpenVINO's profiler.

Usage (files from bench/onnx_export.py):
    .venv/bin/python bench/onnx_profile.py --runtime openvino --batch 1 \\
        bench/out/onnx/timm-tiny.onnx bench/out/onnx/ours224fused-tiny.onnx
    .venv/bin/python bench/onnx_profile.py --runtime onnxruntime --batch 8 ...
Prints, per file, the kernel time per run summed over all nodes and the operator
types that take the most (with how many nodes of each run). Profilers add their
own overhead per node: compare files with each other, not with bench/onnx_ab.py.
Each file's input layout is read from its input shape (NHWC when the last axis is 3).
"""

import argparse
import collections
import json
import os
import tempfile

import numpy as np


def profile_onnxruntime(path, x, runs, threads):
    """{op type: (ms per run, nodes per run)} from ONNX Runtime's profiler."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    images = x if feed.shape[-1] == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    for _ in range(1 + runs):
        session.run(None, {feed.name: images})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    # The first run prepares kernels: only what starts after it ends counts.
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    times, counts = collections.Counter(), collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= first["ts"] + first["dur"]):
            times[event["args"]["op_name"]] += event["dur"] / 1000 / runs
            counts[event["args"]["op_name"]] += 1 / runs
    return {op: (times[op], counts[op]) for op in times}


def profile_openvino(path, x, runs, threads):
    """{(node type, kernel): (ms per run, nodes per run)} from OpenVINO's PERF_COUNT."""
    import openvino

    compiled = openvino.Core().compile_model(
        path, "CPU", {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    shape = compiled.input(0).get_partial_shape()
    last = shape[shape.rank.get_length() - 1]
    images = x if last.is_static and last.get_length() == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    request = compiled.create_infer_request()
    request.infer({0: images})  # the first run prepares kernels
    times, counts = collections.Counter(), collections.Counter()
    for _ in range(runs):
        request.infer({0: images})
        for info in request.profiling_info:
            key = f"{info.node_type} ({info.exec_type})"
            times[key] += info.real_time.total_seconds() * 1000 / runs
            counts[key] += 1 / runs
    return {key: (times[key], counts[key]) for key in times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    profile = profile_onnxruntime if args.runtime == "onnxruntime" else profile_openvino
    print(f"{args.runtime}, batch {args.batch}, {args.threads} threads, {args.runs} runs")
    for path in args.files:
        rows = profile(path, x, args.runs, args.threads)
        total = sum(ms for ms, _ in rows.values())
        print(f"{path}: {total:.1f} ms of kernel time per run")
        for op, (ms, count) in sorted(rows.items(), key=lambda row: -row[1][0])[:args.top]:
            print(f"  {op:44s} {ms:8.2f} ms  {count:5.0f} nodes")


if __name__ == "__main__":
    main()
