"""Whole versus row-halved dense layers on TensorFlow, at GCViT-Tiny's MLP shapes.

The evidence for `tfgcvit.model.layers.ROW_SPLIT_MAX_ROWS`: a chain of 19 residual
MLP blocks (C -> 3C, exact GELU, 3C -> C, each with bias) inside one
`tf.function`, run on the whole (rows, C) matrix or as two row halves that are
concatenated, as `tfgcvit.model.layers._by_row_halves` does. Rows and channels are
those of GCViT-Tiny's stages at batch 1 and 8 (224x224).

Usage (from the repository root; about 3 minutes):
    .venv/bin/python bench/row_split.py
    # other thread counts / CPUs, a few shapes (the tuning decision in tfgcvit.model.tuning):
    taskset -c 0 .venv/bin/python bench/row_split.py --threads 0 --shapes 196x256,784x128
    .venv/bin/python bench/row_split.py --threads 4 --inter-threads 4 --shapes 196x256

It measured forms of the package before issue 29 (`tfgcvit.model.tuning`, `layers._call`,
`layers._by_row_halves`): run it on that tree, e.g. `git archive 96fbcf3 tfgcvit | tar -x -C DIR`
and PYTHONPATH=DIR.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# (rows, channels): GCViT-Tiny's stages 1-4 at batch 1 and at batch 8, then
# fewer rows (smaller images) around the limits.
SHAPES = [(3136, 64), (784, 128), (196, 256), (49, 512),
          (25088, 64), (6272, 128), (1568, 256), (392, 512),
          (49, 128), (98, 128), (49, 256), (98, 256), (98, 512), (196, 512)]
BLOCKS = 19


def mlp_chain(rows, channels, split):
    rng = np.random.default_rng(0)
    weights = [
        [tf.Variable(rng.standard_normal(shape, dtype=np.float32) * 0.03)
         for shape in ((channels, 3 * channels), (3 * channels,),
                       (3 * channels, channels), (channels,))]
        for _ in range(BLOCKS)
    ]

    def mlp(x, w1, b1, w2, b2):
        hidden = tf.nn.bias_add(tf.matmul(x, w1), b1)
        hidden = 0.5 * hidden * (1.0 + tf.math.erf(hidden * 0.7071067811865476))  # as tfgcvit
        return tf.nn.bias_add(tf.matmul(hidden, w2), b2)

    def forward(x):
        for block in weights:
            if split:
                half = tf.shape(x)[0] // 2
                y = tf.concat([mlp(x[:half], *block), mlp(x[half:], *block)], 0)
            else:
                y = mlp(x, *block)
            x = x + y
        return x

    return tf.function(forward, input_signature=[tf.TensorSpec((None, channels))])


def median_seconds(function, x, repeats):
    for _ in range(2):
        function(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def parse_shapes(text):
    try:
        return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 196x256,784x128; got {text!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="TensorFlow intra-op threads; 0 keeps TensorFlow's default "
                             "(the CPUs this process may use)")
    parser.add_argument("--inter-threads", type=int, default=0,
                        help="TensorFlow inter-op threads; 0 (default) keeps TensorFlow's")
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                        help="rows x channels list, e.g. 196x256,784x128 (default: all)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    print(f"intra-op threads {args.threads or 'default'}, inter-op {args.inter_threads or 'default'}, "
          f"usable CPUs {len(os.sched_getaffinity(0))}")
    print("| rows x channels | whole ms | halves ms | halves speed-up |")
    print("|---|---|---|---|")
    for rows, channels in args.shapes:
        x = tf.constant(np.random.default_rng(1).standard_normal((rows, channels), dtype=np.float32))
        repeats = 15 if rows <= 3136 else 5
        whole = median_seconds(mlp_chain(rows, channels, split=False), x, repeats)
        halves = median_seconds(mlp_chain(rows, channels, split=True), x, repeats)
        print(f"| {rows} x {channels} | {whole * 1e3:.1f} | {halves * 1e3:.1f} | {whole / halves:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
