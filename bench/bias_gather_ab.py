"""The relative-position bias of GCViT-Tiny's 31 blocks, gathered in two forms, TensorFlow graph mode.

- "rows, then transpose" (the model's form): `ops.take` of whole table rows (one per
  (query, key) pair, `heads` values each), reshaped and transposed to (heads, 1, N, N);
- "heads first": the table transposed to (heads, entries), then `ops.take` along its
  second axis, which gives (heads, N*N) with no transpose of the large result.

Both produce the same values (checked); each form is a `tf.function` over all 31 biases,
timed alternately for ROUNDS rounds.

Usage: KERAS_BACKEND=tensorflow .venv/bin/python bench/bias_gather_ab.py [ROUNDS]
"""
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfgcvit.model.layers import relative_position_index  # noqa: E402

# GCViT-Tiny: (window, heads, blocks) per stage.
STAGES = [(7, 2, 3), (7, 4, 4), (14, 8, 19), (7, 16, 5)]

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
rng = np.random.default_rng(0)
tables = [[tf.Variable(rng.standard_normal(((2 * w - 1) ** 2, h)).astype("float32")) for _ in range(n)]
          for w, h, n in STAGES]
indices = [relative_position_index(w).reshape(-1) for w, _, _ in STAGES]


def rows_then_transpose():
    out = []
    for (w, h, _), stage, index in zip(STAGES, tables, indices):
        for table in stage:
            bias = ops.reshape(ops.take(table, index, axis=0), (1, w * w, w * w, h))
            out.append(ops.transpose(bias, (3, 0, 1, 2)))
    return out


def heads_first():
    out = []
    for (w, h, _), stage, index in zip(STAGES, tables, indices):
        for table in stage:
            out.append(ops.reshape(ops.take(ops.transpose(table), index, axis=1), (h, 1, w * w, w * w)))
    return out


forms = {"rows, then transpose": tf.function(rows_then_transpose), "heads first": tf.function(heads_first)}
results = {name: function() for name, function in forms.items()}
for a, b in zip(*results.values()):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
times = {name: [] for name in forms}
for r in range(rounds):
    for name in list(forms) if r % 2 else list(forms)[::-1]:
        start = time.perf_counter()
        forms[name]()
        times[name].append(time.perf_counter() - start)
for name, values in times.items():
    print(f"{name:22s} median {1e3 * statistics.median(values):6.2f} ms for 31 biases ({rounds} rounds)")
