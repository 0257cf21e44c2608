"""Whole versus row-halved dense layers on TensorFlow, at GCViT-Tiny's MLP shapes.

The evidence for `tfgcvit.layers.ROW_SPLIT_MAX_ROWS`: a chain of 19 residual
MLP blocks (C -> 3C, exact GELU, 3C -> C, each with bias) inside one
`tf.function`, run on the whole (rows, C) matrix or as two row halves that are
concatenated, as `tfgcvit.layers._by_row_halves` does. Rows and channels are
those of GCViT-Tiny's stages at batch 1 and 8 (224x224).

Usage (from the repository root; about 3 minutes):
    .venv/bin/python bench/row_split.py
"""

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
        hidden = tf.nn.gelu(tf.nn.bias_add(tf.matmul(x, w1), b1), approximate=False)
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


def main():
    tf.config.threading.set_intra_op_parallelism_threads(2)
    print("| rows x channels | whole ms | halves ms | halves speed-up |")
    print("|---|---|---|---|")
    for rows, channels in SHAPES:
        x = tf.constant(np.random.default_rng(1).standard_normal((rows, channels), dtype=np.float32))
        repeats = 15 if rows <= 3136 else 5
        whole = median_seconds(mlp_chain(rows, channels, split=False), x, repeats)
        halves = median_seconds(mlp_chain(rows, channels, split=True), x, repeats)
        print(f"| {rows} x {channels} | {whole * 1e3:.1f} | {halves * 1e3:.1f} | {whole / halves:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
