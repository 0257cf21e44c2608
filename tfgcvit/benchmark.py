"""Inference benchmark of the GC ViT models on one Keras backend.

Measures, for random weights and a random batch:

- throughput (images/s) and latency per batch (median, quartiles, min, max)
  over `--repeats` timed runs after `--warmup` untimed ones;
- the time from the model constructor call to the first output (build,
  tracing and compilation included);
- peak resident memory of the process (`ru_maxrss`);
- the analytic cost of the model (GFLOP per image) and the achieved GFLOP/s.

The backend is fixed when Keras is imported: when nothing has imported Keras
yet, `main` sets `KERAS_BACKEND` (and the thread variables) in this process;
otherwise, if the requested backend or thread count differs from the running
process, the benchmark re-runs itself in a child process with them set.

Inference paths (`--path`); the default is the fastest one measured on CPU
(see BENCHMARKS.md):

- tensorflow: `function` = `tf.function` of `model(x, training=False)`, graph
  mode with oneDNN kernels (default, also `--no-jit`); `xla` = the same with
  `jit_compile=True` (`--jit`; several times slower on CPU, where XLA's
  convolutions are slow); `predict` = `model.predict_on_batch`; `eager` =
  `model(x, training=False)` op by op.
- jax: `jit` = `jax.jit` of `model.stateless_call` (default, `--jit` and
  `--no-jit`: JAX has no fast uncompiled path); `predict` =
  `model.predict_on_batch` (also jitted, by Keras).
- torch: `eager` = `model(x, training=False)` under `torch.no_grad` (default,
  `--no-jit`); `compile` = `torch.compile` of the same (`--jit`); `predict` =
  `model.predict_on_batch`.

Usage:
    python -m tfgcvit.benchmark --model tiny --batch-size 8 --backend tensorflow
"""

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from tfgcvit.config import VARIANTS, flop_count, variant_name

BACKENDS = ("tensorflow", "jax", "torch")
DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")
# Inference paths per backend: (path used by --jit, path used by --no-jit, all paths).
PATHS = {
    "tensorflow": ("xla", "function", ("xla", "function", "predict", "eager")),
    "jax": ("jit", "jit", ("jit", "predict")),
    "torch": ("compile", "eager", ("eager", "compile", "predict", "predict-compiled")),
}
# Default path per backend when neither --jit nor --no-jit nor --path is given.
DEFAULT_PATHS = {"tensorflow": "function", "jax": "jit", "torch": "eager"}
_CHILD_ENV = "TFGCVIT_BENCHMARK_CHILD"


def parse_size(text):
    """Parses "224" or "256x320" into (height, width)."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 32:
        raise argparse.ArgumentTypeError(f"size must be N or HxW with N >= 32, got {text!r}")
    return tuple(sizes)


def add_arguments(parser):
    """Adds the benchmark options to an `argparse` parser."""
    parser.add_argument("--model", default="tiny",
                        help="variant name: xxtiny, xtiny, tiny, tiny2, small, small2, base, "
                             "large, large_384, large_512 (aliases nano, micro); default tiny")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="input size N or HxW (default: the variant's native size)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="Keras backend (default: $KERAS_BACKEND or tensorflow)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="Keras dtype policy (default float32)")
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled path (TF: XLA; JAX: jax.jit; torch: torch.compile) or "
                             "not (TF: tf.function; torch: eager). Default: the backend's "
                             "fastest path on CPU (TF: xla, JAX: jit, torch: eager)")
    parser.add_argument("--path", default=None,
                        help="explicit inference path, overrides --jit: "
                             + "; ".join(f"{b}: {', '.join(p[2])}" for b, p in PATHS.items()))
    parser.add_argument("--repeats", type=int, default=10, help="timed batches (default 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed batches after the first output (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: every core the process may use)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _requested_backend(args):
    return args.backend or os.environ.get("KERAS_BACKEND") or "tensorflow"


def _to_argv(args):
    """The command-line arguments that reproduce `args` in a child process."""
    argv = ["--model", str(args.model), "--batch-size", str(args.batch_size),
            "--backend", _requested_backend(args), "--dtype", args.dtype,
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--seed", str(args.seed)]
    if args.size is not None:
        argv += ["--size", f"{args.size[0]}x{args.size[1]}"]
    if args.jit is not None:
        argv.append("--jit" if args.jit else "--no-jit")
    if args.path is not None:
        argv += ["--path", args.path]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.json:
        argv.append("--json")
    return argv


def _backend_env(backend, threads):
    """Variables that select the backend and thread counts before the frameworks load."""
    env = {"KERAS_BACKEND": backend}
    if threads is not None:
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _restrict_cpus(threads):
    """Pins the process to `threads` CPUs, which every backend's thread pool respects."""
    if threads is None or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def choose_path(backend, jit=None, path=None):
    """The inference path for a backend given --jit/--no-jit and --path."""
    jit_path, nojit_path, paths = PATHS[backend]
    if path is not None:
        if path not in paths:
            raise ValueError(f"Path {path!r} is not one of {', '.join(paths)} on {backend}.")
        return path
    if jit is None:
        return DEFAULT_PATHS[backend]
    return jit_path if jit else nojit_path


def variant_config(name):
    """(variant name, its `tfgcvit.config.VARIANTS` entry) for a name or alias ("nano")."""
    variant = variant_name(name)
    return variant, VARIANTS[variant]


def cpu_model():
    """The CPU model name from /proc/cpuinfo (or what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def peak_rss_mib():
    """Peak resident memory of this process (`ru_maxrss`) in MiB."""
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _map(function, x):
    return [function(item) for item in x] if isinstance(x, (list, tuple)) else function(x)


def _make_runner(model, backend, path, x):
    """Returns (run, device_input): run(device_input) -> numpy output of one batch.

    Args:
        model: a Keras model.
        backend: the Keras backend in use.
        path: an inference path of that backend (see `PATHS`).
        x: a numpy batch, or a list of them for a model with several inputs.
    """
    import keras

    if path in ("predict", "predict-compiled"):
        if path == "predict-compiled":
            # Keras' own compiled execution on PyTorch: predict_step under torch.compile.
            model.compile(jit_compile=True)
        return (lambda inp: np.asarray(model.predict_on_batch(inp))), x

    if backend == "tensorflow":
        import tensorflow as tf

        tx = _map(tf.constant, x)
        if path == "eager":
            return (lambda inp: model(inp, training=False).numpy()), tx
        compiled = tf.function(
            lambda inp: model(inp, training=False), jit_compile=(path == "xla"), reduce_retracing=True
        )
        return (lambda inp: compiled(inp).numpy()), tx

    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def infer(trainable, non_trainable, inp):
            outputs, _ = model.stateless_call(trainable, non_trainable, inp, training=False)
            return outputs

        jx = _map(jax.device_put, x)
        return (lambda inp: np.asarray(infer(trainable, non_trainable, inp))), jx

    if backend == "torch":
        import torch

        tx = _map(keras.ops.convert_to_tensor, x)
        forward = lambda inp: model(inp, training=False)
        if path == "compile":
            forward = torch.compile(forward)

        def run(inp):
            with torch.no_grad():
                return forward(inp).detach().cpu().float().numpy()

        return run, tx
    raise ValueError(f"Unknown backend {backend!r}.")


def run_benchmark(args):
    """Runs the benchmark in this process and returns the result dict.

    Keras must already use the requested backend (see `main`).
    """
    import keras

    from tfgcvit.model.gcvit import get_constructor

    backend = keras.backend.backend()
    path = choose_path(backend, args.jit, args.path)
    variant, config = variant_config(args.model)
    constructor = get_constructor(variant)
    height, width = args.size or (config["input_size"],) * 2
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --repeats must be >= 1 and --warmup >= 0.")
    if args.threads is not None and backend == "torch":
        import torch

        torch.set_num_threads(args.threads)

    keras.mixed_precision.set_global_policy(args.dtype)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch_size, height, width, 3), dtype=np.float32)

    start = time.perf_counter()
    model = constructor(weights=None, input_shape=(height, width, 3))
    built = time.perf_counter()
    run, device_x = _make_runner(model, backend, path, x)
    output = run(device_x)
    first = time.perf_counter()
    if not np.all(np.isfinite(output)):
        raise RuntimeError("The model produced non-finite outputs.")

    for _ in range(args.warmup):
        run(device_x)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run(device_x)
        times.append(time.perf_counter() - t0)

    times_ms = np.array(times) * 1e3
    median = float(np.median(times_ms))
    flops = flop_count(config, height, width)
    images_per_second = args.batch_size / (median / 1e3)
    backend_module = importlib.import_module(backend)
    return {
        "model": variant,
        "backend": backend,
        "path": path,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "height": height,
        "width": width,
        "threads": _cpu_count(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "images_per_second": images_per_second,
        "latency_ms": {
            "median": median,
            "p25": float(np.percentile(times_ms, 25)),
            "p75": float(np.percentile(times_ms, 75)),
            "min": float(times_ms.min()),
            "max": float(times_ms.max()),
            "mean": float(times_ms.mean()),
        },
        "constructor_seconds": built - start,
        "time_to_first_output_seconds": first - start,
        "peak_rss_mib": peak_rss_mib(),
        "gflop_per_image": flops / 1e9,
        "achieved_gflop_per_second": flops * images_per_second / 1e9,
        "params": int(model.count_params()),
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            backend: backend_module.__version__,
            "numpy": np.__version__,
        },
        "cpu": cpu_model(),
    }


def format_result(result):
    """A human-readable summary of a result dict."""
    lat = result["latency_ms"]
    return "\n".join([
        f"GC ViT-{result['model']} {result['height']}x{result['width']} batch "
        f"{result['batch_size']}, {result['backend']} ({result['path']}), {result['dtype']}, "
        f"{result['threads']} threads",
        f"  throughput      {result['images_per_second']:.2f} images/s",
        f"  latency/batch   median {lat['median']:.1f} ms, IQR {lat['p25']:.1f}-{lat['p75']:.1f} ms, "
        f"min {lat['min']:.1f}, max {lat['max']:.1f} ({result['repeats']} runs after "
        f"{result['warmup']} warm-up)",
        f"  first output    {result['time_to_first_output_seconds']:.2f} s after the constructor "
        f"call (constructor {result['constructor_seconds']:.2f} s)",
        f"  peak RSS        {result['peak_rss_mib']:.0f} MiB",
        f"  compute         {result['gflop_per_image']:.2f} GFLOP/image, "
        f"{result['achieved_gflop_per_second']:.1f} GFLOP/s achieved",
    ])


def main(args):
    """Runs the benchmark described by parsed `args`; returns the exit status."""
    backend = _requested_backend(args)
    if backend not in BACKENDS:
        print(f"error: unknown backend {backend!r}", file=sys.stderr)
        return 2
    if os.environ.get(_CHILD_ENV) != "1":
        if "keras" not in sys.modules:
            # Nothing has loaded Keras (or the frameworks) yet: configure this process.
            os.environ.update(_backend_env(backend, args.threads))
        else:
            import keras

            if keras.backend.backend() != backend or args.threads is not None:
                # Keras fixed its backend at import: measure in a fresh process.
                command = [sys.executable, "-m", "tfgcvit.benchmark", *_to_argv(args)]
                env = dict(os.environ, **_backend_env(backend, args.threads))
                env[_CHILD_ENV] = "1"
                return subprocess.call(command, env=env)
    _restrict_cpus(args.threads)
    try:
        result = run_benchmark(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def _parse(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tfgcvit.benchmark", description=__doc__.split("\n\n")[0]
    )
    return add_arguments(parser).parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(_parse()))
