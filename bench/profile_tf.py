"""Where the TensorFlow-backend CPU time of a GC ViT forward pass goes.

Runs the model under the TensorFlow profiler (graph mode, `tf.function`,
optionally XLA) and adds up the kernel times of the trace by op type and by
layer (block indices folded: `levels_2/blocks_*/attn`), then prints the top
entries as markdown tables.

Usage (from the repository root):
    KERAS_BACKEND=tensorflow .venv/bin/python bench/profile_tf.py --model tiny --batch-size 8

Kernel times come from the trace's compute threads; with several inter-op
threads they can add up to more than the wall time, so read them as shares.
"""

import argparse
import collections
import glob
import os
import re
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

try:
    from tsl.profiler.protobuf import xplane_pb2  # noqa: E402
except ImportError:  # older layouts
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from tfgcvit.model.gcvit import get_constructor  # noqa: E402

# Trace events that are bookkeeping, not kernels.
SKIP = re.compile(r"^(ThreadpoolListener|ExecutorState|EagerExecute|TFE_|ReadVariableOp|"
                  r"\$|MemoryAllocation|Memory|ParallelFor)")


def kernel_events(logdir):
    """Yields (op name, op type, microseconds) of every kernel in the trace."""
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    meta = plane.event_metadata[event.metadata_id]
                    name, op_type = meta.name, meta.display_name or meta.name
                    if SKIP.match(name) or SKIP.match(op_type):
                        continue
                    yield name, op_type, event.duration_ps / 1e6


def layer_of(op_name):
    """'gcvit_tiny_1/levels_2_1/blocks_3_1/attn_1/MatMul:MatMul' -> 'levels_2/blocks_*/attn'."""
    scope = op_name.split(":")[0].split("/")[1:-1]
    scope = [re.sub(r"_\d+$", "", part) if re.search(r"_\d+_\d+$|^[a-z_]+\d*_\d+$", part)
             else part for part in scope]
    scope = [re.sub(r"^blocks_\d+$", "blocks_*", part) for part in scope]
    return "/".join(scope) or "(model)"


def table(title, totals, counts, wall_us, top):
    lines = [f"### {title}", "", "| name | ms per step | share | kernels per step |", "|---|---|---|---|"]
    total = sum(totals.values())
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {us / 1e3:.1f} | {100 * us / total:.1f}% | {counts[name]:.0f} |")
    lines.append(f"| (all kernels) | {total / 1e3:.1f} | 100% | {sum(counts.values()):.0f} |")
    lines.append(f"| (wall time per step) | {wall_us / 1e3:.1f} | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--xla", action="store_true", help="profile the XLA-compiled graph")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    model = get_constructor(args.model)(weights=None, input_shape=(args.size, args.size, 3))
    x = tf.constant(np.random.default_rng(0).standard_normal(
        (args.batch_size, args.size, args.size, 3), dtype=np.float32))
    forward = tf.function(lambda inp: model(inp, training=False), jit_compile=args.xla)
    for _ in range(3):
        forward(x).numpy()
    logdir = tempfile.mkdtemp(prefix="gcvit-profile-")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.steps):
        forward(x).numpy()
    wall_us = (time.perf_counter() - start) / args.steps * 1e6
    tf.profiler.experimental.stop()

    by_type, by_layer = collections.Counter(), collections.Counter()
    type_counts, layer_counts = collections.Counter(), collections.Counter()
    for name, op_type, us in kernel_events(logdir):
        by_type[op_type] += us / args.steps
        type_counts[op_type] += 1 / args.steps
        layer = layer_of(name)
        by_layer[layer] += us / args.steps
        layer_counts[layer] += 1 / args.steps
    header = (f"GCViT-{args.model}, batch {args.batch_size}, {args.size}x{args.size}, "
              f"{'XLA' if args.xla else 'tf.function'}, TF {tf.__version__}")
    print(f"## {header}\n")
    print(table("By op type", by_type, type_counts, wall_us, args.top) + "\n")
    print(table("By layer", by_layer, layer_counts, wall_us, args.top))
    print(f"\n(trace in {logdir})")


if __name__ == "__main__":
    main()
