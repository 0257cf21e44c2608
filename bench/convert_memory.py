"""Peak memory and time of reading an official-format GC ViT checkpoint with tfgcvit.

Makes a checkpoint shaped like the official GC ViT-Base one (random weights plus
Adam-like optimizer state, `args` as an argparse.Namespace, epoch, ...: what
timm's training script writes, and what the official files are) in a temporary
directory, then measures in fresh processes:

- `read_checkpoint(path)`: reading the `state_dict` entry (torch made unimportable);
- the same followed by writing the converted `.npz` cache, as the first
  `weights="imagenet"` load does;
- for reference, `torch.load(path)`, which materialises everything.

Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end minus the
RSS right after the imports. The target: less than 1.5x the bytes of the
weights (the optimizer state, twice that size, must never be materialised).

Run: python bench/convert_memory.py [--variant base] [--keep]
Needs torch (to write the checkpoint) and about 3x the checkpoint size in free memory.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: prints one JSON line with the measurements.
_MEASURE = r"""
import json, os, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]

def rss_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if mode == "torch":
    import torch
    baseline = rss_bytes()
    start = time.perf_counter()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
else:
    sys.modules["torch"] = None  # prove the reader does not need it
    import importlib.util
    import numpy as np
    # The reader needs only numpy: load the module alone so that TensorFlow's
    # import does not dominate the process's peak memory.
    spec = importlib.util.spec_from_file_location("checkpoint", os.path.join(sys.argv[3], "tfgcvit", "checkpoint.py"))
    checkpoint_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoint_module)
    baseline = rss_bytes()
    start = time.perf_counter()
    state = checkpoint_module.read_checkpoint(path)
    if mode == "read+npz":
        with open(sys.argv[4], "wb") as file:
            np.savez(file, **state)
    seconds = time.perf_counter() - start
    weights = sum(v.nbytes for v in state.values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
# VmHWM: the same peak, but of this program only (ru_maxrss also counts the
# parent's RSS at fork time, which is why the parent of this process stays small).
with open("/proc/self/status") as file:
    hwm = next(int(line.split()[1]) * 1024 for line in file if line.startswith("VmHWM:"))
print(json.dumps(dict(seconds=seconds, baseline=baseline, peak=peak, hwm=hwm, weights=weights)))
"""


def official_shapes(variant):
    """Official (PyTorch) tensor names and shapes of a variant, derived from the Keras model."""
    from tfgcvit.model.gcvit import get_constructor
    from tfgcvit.weights.mapping import CONV, DENSE, DEPTHWISE, keras_weight_table

    model = get_constructor(variant)(weights=None)
    shapes = {}
    for name, variable, layout in keras_weight_table(model):
        shape = tuple(variable.shape)
        if layout == DENSE:
            shape = shape[::-1]
        elif layout == CONV:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif layout == DEPTHWISE:
            shape = (shape[2], 1, shape[0], shape[1])
        shapes[name] = shape
        if name.endswith("relative_position_bias_table"):
            window = (int(round(shape[0] ** 0.5)) + 1) // 2
            index_name = name.replace("relative_position_bias_table", "relative_position_index")
            shapes[index_name] = (window * window, window * window)
    return shapes


def make_checkpoint(path, variant):
    """Writes a training checkpoint with random weights and Adam state; returns byte counts."""
    import torch
    from collections import OrderedDict

    generator = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for name, shape in official_shapes(variant).items():
        if name.endswith("relative_position_index"):
            state[name] = torch.randint(0, shape[0], shape, generator=generator)
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.02
    parameters = [t for n, t in state.items() if not n.endswith("relative_position_index")]
    optimizer = {
        "state": {
            i: {"step": torch.tensor(300.0), "exp_avg": torch.randn(t.shape, generator=generator) * 1e-3,
                "exp_avg_sq": torch.rand(t.shape, generator=generator) * 1e-6}
            for i, t in enumerate(parameters)
        },
        "param_groups": [{"lr": 5e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                          "params": list(range(len(parameters)))}],
    }
    checkpoint = {
        "epoch": 309,
        "arch": f"gc_vit_{variant}",
        "state_dict": state,
        "optimizer": optimizer,
        "version": 2,
        "args": argparse.Namespace(model=f"gc_vit_{variant}", lr=5e-3, epochs=310, batch_size=128,
                                   opt="adamw", model_ema=False, input_size=[3, 224, 224]),
        "metric": 85.0,
    }
    torch.save(checkpoint, path)
    weights = sum(t.numel() * t.element_size() for t in state.values())
    optimizer_bytes = sum(v.numel() * v.element_size() for s in optimizer["state"].values() for v in s.values())
    parameters_count = sum(t.numel() for t in parameters)
    return dict(weights=weights, optimizer=optimizer_bytes, parameters=parameters_count,
                file=os.path.getsize(path))


def measure(mode, path, scratch):
    command = [sys.executable, "-c", _MEASURE, mode, path, REPO, os.path.join(scratch, "converted.npz")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"measurement {mode!r} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="base", help="official variant whose shapes to use (default: base)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--no-torch-load", action="store_true", help="skip the torch.load reference row")
    parser.add_argument("--make", metavar="PATH", help=argparse.SUPPRESS)  # internal: write the checkpoint only
    args = parser.parse_args()

    if args.make:
        print(json.dumps(make_checkpoint(args.make, args.variant)))
        return

    scratch = tempfile.mkdtemp(prefix="tfgcvit-bench-", dir=args.dir)
    try:
        path = os.path.join(scratch, f"gcvit_{args.variant}_bench.pth.tar")
        start = time.perf_counter()
        # In a child process: this one must stay small, because a child's ru_maxrss
        # starts from its parent's RSS.
        made = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", args.variant, "--make", path],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise SystemExit(f"making the checkpoint failed:\n{made.stderr[-3000:]}")
        sizes = json.loads(made.stdout.strip().splitlines()[-1])
        print(f"checkpoint: {path}, made in {time.perf_counter() - start:.1f} s")
        print(f"  GC ViT-{args.variant}: {sizes['parameters']:,} parameters; file {sizes['file'] / 1e6:.1f} MB = "
              f"weights {sizes['weights'] / 1e6:.1f} MB + optimizer state {sizes['optimizer'] / 1e6:.1f} MB + pickle")

        rows = [("read_checkpoint(path) [state_dict]", measure("read", path, scratch)),
                ("read_checkpoint + write converted .npz", measure("read+npz", path, scratch))]
        if not args.no_torch_load:
            rows.append(("torch.load(path) (reference: everything)", measure("torch", path, scratch)))

        weights = sizes["weights"]
        print()
        print(f"| step | time (s) | peak RSS increase, ru_maxrss (MB) | x weight bytes ({weights / 1e6:.1f} MB) "
              "| peak RSS increase, VmHWM (MB) |")
        print("|---|---|---|---|---|")
        for label, result in rows:
            increase = result["peak"] - result["baseline"]
            print(f"| {label} | {result['seconds']:.2f} | {increase / 1e6:.1f} | {increase / weights:.2f} "
                  f"| {(result['hwm'] - result['baseline']) / 1e6:.1f} |")
        reader = rows[0][1]
        ratio = (reader["peak"] - reader["baseline"]) / weights
        print()
        print(f"target: peak RSS increase < 1.5x weight bytes -> {'met' if ratio < 1.5 else 'NOT met'} ({ratio:.2f}x)")
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        print(f"command: python bench/convert_memory.py --variant {args.variant}")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
