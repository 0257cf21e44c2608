"""The window partition's axis swap with one column of windows: kept (before) or left out (now).

One process, TensorFlow backend: two GCViT-Tiny models (same seed), one traced
with `_swap_window_axes` always transposing (the form before), one with the
current code, which leaves out the transposes that only move a size-1 axis;
`predict_on_batch` timed in turn for ROUNDS rounds, with the count of
transposes in each traced graph and the largest output difference.

Usage: .venv/bin/python bench/window_transpose_ab.py BATCH ROUNDS [SIZE]
"""
import os
import sys
import time

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfgcvit import GCViTTiny  # noqa: E402
from tfgcvit.model import layers as L  # noqa: E402

current = L._swap_window_axes


def always(x, columns):
    return ops.transpose(x, (0, 1, 3, 2, 4, 5))


def transposes(model, batch, size):
    import tensorflow as tf

    function = tf.function(lambda t: model(t, training=False))
    graph = function.get_concrete_function(tf.TensorSpec((batch, size, size, 3), tf.float32)).graph
    return sum(op.type == "Transpose" for op in graph.get_operations())


batch, rounds = int(sys.argv[1]), int(sys.argv[2])
size = int(sys.argv[3]) if len(sys.argv) > 3 else 224
x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype("float32")
runs = {}
for name, swap in [("always transposed (before)", always), ("size-1 swap left out (now)", current)]:
    L._swap_window_axes = swap
    keras.utils.set_random_seed(0)
    model = GCViTTiny(weights=None, input_shape=(size, size, 3))
    out = model.predict_on_batch(x)
    model.predict_on_batch(x)
    runs[name] = (model, out, transposes(model, batch, size))
L._swap_window_axes = current
names = list(runs)
times = {k: [] for k in runs}
for r in range(rounds):
    for k in names if r % 2 else names[::-1]:
        start = time.perf_counter()
        runs[k][0].predict_on_batch(x)
        times[k].append(time.perf_counter() - start)
base = np.array(times[names[0]])
reference = runs[names[0]][1]
print(f"GCViT-Tiny, batch {batch}, {size}x{size}, {rounds} rounds, {keras.backend.backend()}")
for k, v in times.items():
    v = np.array(v)
    print(f"{k:28s} transposes {runs[k][2]:4d}  median {1000 * np.median(v):7.1f} ms  "
          f"paired speed vs before {np.median(base / v):.3f}  max|diff| {np.abs(runs[k][1] - reference).max():.1e}")
