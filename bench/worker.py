"""Long-lived benchmark worker: builds one model once, then times batches on command.

Run by `bench/compare_cpu.py` (and `bench/gpu.py`) in the Python environment of
the implementation under test; it talks JSON lines over stdin/stdout:

- on start it builds the model, runs the first batch and `--warmup` more, and
  prints {"ready": true, ...} with the import, constructor and first-output
  times;
- "run K" times K consecutive batches and prints {"times": [seconds, ...]};
- "info" prints {"peak_rss_mib": ...};
- "quit" (or end of input) exits.

Implementations (`--impl`):

- `keras`: this repository's model on the Keras backend named by
  $KERAS_BACKEND, through `tfgcvit.benchmark`'s inference paths.
- `seed`: the original port (tfgcvit 2.0.4, TensorFlow 2.12 / Keras 2), run
  from its own virtual environment; paths `function` (tf.function),
  `xla` (tf.function(jit_compile=True)), `predict` (predict_on_batch).
- `timm`: timm's GC ViT in PyTorch; paths `eager` (torch.no_grad) and
  `compile` (torch.compile); `--autocast bfloat16` and `--tf32` for GPUs.
- `onnx`: an ONNX file (`--onnx-file`, from `bench/onnx_export.py`) in a
  runtime: paths `onnxruntime` (CPU provider) and `openvino` (CPU device);
  `--layout nchw` for timm's file.

Every implementation gets the same input: standard normal NHWC images from
`numpy.random.default_rng(seed)`, transposed to NCHW for timm.
"""

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

# The port of the original tfgcvit (2.0.4) names its constructors after these.
SEED_NAMES = {"xxtiny": "GCViTNano", "nano": "GCViTNano", "xtiny": "GCViTMicro",
              "micro": "GCViTMicro", "tiny": "GCViTTiny",
              "small": "GCViTSmall", "base": "GCViTBase",
              "large": "GCViTLarge"}
TIMM_NAMES = {"xxtiny": "gcvit_xxtiny", "nano": "gcvit_xxtiny", "xtiny": "gcvit_xtiny",
              "micro": "gcvit_xtiny", "tiny": "gcvit_tiny", "small": "gcvit_small",
              "base": "gcvit_base"}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib():
    """Peak resident memory of this process in MiB (Linux: ru_maxrss is in KiB).

    Computed here, not by `tfgcvit.benchmark`: the original port's worker runs
    where `tfgcvit` is the 2.0.4 package, which cannot load this checkout's module.
    """
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def benchmark_module():
    """This checkout's `tfgcvit/benchmark.py`, loaded by path.

    The inference paths then stay those of the checkout even when the
    `tfgcvit` package under test is another one (an older revision on
    PYTHONPATH, see compare_cpu.py's `@REF`).
    """
    spec = importlib.util.spec_from_file_location(
        "_tfgcvit_benchmark", os.path.join(ROOT, "tfgcvit", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tf.function's AutoGraph looks functions up there
    spec.loader.exec_module(module)
    return module


def build_seed(args, x):
    """The original port: tfgcvit 2.0.4 on TensorFlow 2.12."""
    import tensorflow as tf
    import tfgcvit

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.dtype != "float32":
        tf.keras.mixed_precision.set_global_policy(args.dtype)
    constructor = getattr(tfgcvit, SEED_NAMES[args.model])
    start = time.perf_counter()
    model = constructor(weights=None, input_shape=(args.height, args.width, 3))
    if args.path == "predict":
        run = lambda: np.asarray(model.predict_on_batch(x))
    else:
        tx = tf.constant(x)
        compiled = tf.function(lambda inp: model(inp, training=False),
                               jit_compile=(args.path == "xla"))
        run = lambda: compiled(tx).numpy()
    versions = {"tensorflow": tf.__version__, "tfgcvit": getattr(tfgcvit, "__version__", "2.0.4")}
    return start, model.count_params(), run, versions


def build_keras(args, x):
    """This repository's model on the Keras backend of $KERAS_BACKEND."""
    import tfgcvit  # noqa: F401  (first, as a user's `import tfgcvit`: it keeps JAX out of TF processes)
    import keras

    from tfgcvit.model import get_constructor

    bench = benchmark_module()
    backend = keras.backend.backend()
    args.path = bench.choose_path(backend, path=args.path)
    if args.threads and backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if args.threads and backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.mixed_precision.set_global_policy(args.dtype)
    variant, config = bench.variant_config(args.model)
    constructor = get_constructor(variant)
    args.gflop = bench.flop_count(config, args.height, args.width) / 1e9
    start = time.perf_counter()
    model = constructor(weights=None, input_shape=(args.height, args.width, 3))
    runner, device_x = bench._make_runner(model, backend, args.path, x)
    backend_module = __import__(backend)
    versions = {"keras": keras.__version__, backend: backend_module.__version__}
    return start, model.count_params(), lambda: runner(device_x), versions


def build_timm(args, x):
    """timm's GC ViT in PyTorch (eager or torch.compile, optional autocast)."""
    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    kwargs = {}
    if (args.height, args.width) != (224, 224):
        kwargs["img_size"] = (args.height, args.width)
    model = timm.create_model(TIMM_NAMES[args.model], pretrained=False, **kwargs)
    model = model.eval().to(device)
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    forward = torch.compile(model) if args.path == "compile" else model
    autocast = args.autocast

    def run():
        with torch.no_grad():
            if autocast:
                with torch.autocast(device.type, dtype=getattr(torch, autocast)):
                    y = forward(tx)
            else:
                y = forward(tx)
        return y.float().cpu().numpy()

    versions = {"torch": torch.__version__, "timm": timm.__version__}
    return start, sum(p.numel() for p in model.parameters()), run, versions


def build_onnx(args, x):
    """An ONNX file in onnxruntime or OpenVINO, with the worker's thread count."""
    inp = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if args.layout == "nchw" else x
    start = time.perf_counter()
    if args.path == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(args.onnx_file, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = lambda: session.run(None, {name: inp})[0]
        versions = {"onnxruntime": onnxruntime.__version__}
    elif args.path == "openvino":
        import openvino

        core = openvino.Core()
        # OpenVINO computes in bfloat16 by default on CPUs that have it; --dtype says which.
        precision = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[args.dtype]
        config = {"INFERENCE_PRECISION_HINT": precision}
        if args.threads:
            config["INFERENCE_NUM_THREADS"] = args.threads
        compiled = core.compile_model(args.onnx_file, "CPU", config)
        request = compiled.create_infer_request()
        run = lambda: request.infer({0: inp})[compiled.output(0)]
        versions = {"openvino": openvino.__version__,
                    "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))}
    else:
        raise SystemExit(f"unknown ONNX runtime {args.path!r}: use onnxruntime or openvino")
    import onnx

    model = onnx.load(args.onnx_file)
    params = sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)
    return start, params, run, versions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("keras", "seed", "timm", "onnx"), required=True)
    parser.add_argument("--onnx-file", default=None, help="onnx: the file to run")
    parser.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc", help="onnx: input layout")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--path", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for timm")
    parser.add_argument("--autocast", default=None, help="timm: torch.autocast dtype, e.g. bfloat16")
    parser.add_argument("--tf32", action="store_true", help="timm: allow TF32 matmuls")
    parser.add_argument("--hide-jax", action="store_true",
                        help="make JAX unimportable, as in an environment without it: TensorFlow "
                             "2.21 imports JAX whenever it is installed (tensorflow/lite/python/"
                             "util.py), which adds about 140 MiB to a TensorFlow process")
    args = parser.parse_args()
    if args.hide_jax:
        sys.modules["jax"] = None
    args.gflop = None
    if args.path is None:
        args.path = {"seed": "function", "timm": "eager", "onnx": "onnxruntime"}.get(args.impl)

    # Keep the protocol channel clean: anything a library prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    t_import = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch_size, args.height, args.width, 3), dtype=np.float32)
    builder = {"seed": build_seed, "keras": build_keras, "timm": build_timm, "onnx": build_onnx}[args.impl]
    start, params, run, versions = builder(args, x)
    # `start` is taken just before the constructor call, after the imports.
    output = run()
    first = time.perf_counter()
    for _ in range(args.warmup):
        run()
    versions.update(python=platform.python_version(), numpy=np.__version__)
    send({
        "ready": True,
        "impl": args.impl,
        "path": args.path,
        "params": int(params),
        "import_seconds": start - t_import,
        "time_to_first_output_seconds": first - start,
        "finite": bool(np.all(np.isfinite(output))),
        "gflop_per_image": args.gflop,
        "versions": versions,
    })
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "run":
            times = []
            for _ in range(int(command[1]) if len(command) > 1 else 1):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            send({"times": times})
        elif command[0] == "info":
            send({"peak_rss_mib": peak_rss_mib()})
        else:
            send({"error": f"unknown command {command[0]!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
