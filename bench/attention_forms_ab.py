"""The attention's head split and global-query forms on the TensorFlow backend: one process, interleaved.

Four GCViT-Tiny models (same seed), each traced with one form of
`WindowAttention.attend`: queries/keys/values split by strided slices (`x[i]`,
before round 12) or `ops.unstack` (now), and the global query broadcast
(`ops.broadcast_to`, before) or tiled (`ops.tile`, now); `predict_on_batch`
timed in turn for ROUNDS rounds. The forms were changed for TFLite
(bench/tflite_ab.py); this checks that TensorFlow does not pay for it.

Usage: .venv/bin/python bench/attention_forms_ab.py BATCH ROUNDS

It measured forms of the package before issue 29 (`tfgcvit.model.tuning`, `layers._call`,
`layers._by_row_halves`): run it on that tree, e.g. `git archive 96fbcf3 tfgcvit | tar -x -C DIR`
and PYTHONPATH=DIR.
"""
import os
import sys
import time

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfgcvit import GCViTTiny
from tfgcvit.model import layers as L


def split_slices(self, x, tokens, parts):
    x = ops.reshape(x, (-1, tokens, parts, self.num_heads, self.head_dim))
    x = ops.transpose(x, (2, 3, 0, 1, 4))
    return [x[i] for i in range(parts)]


def split_unstack(self, x, tokens, parts):
    x = ops.reshape(x, (-1, tokens, parts, self.num_heads, self.head_dim))
    x = ops.transpose(x, (2, 3, 0, 1, 4))
    return ops.unstack(x, parts, axis=0)


def make_attend(split, tile):
    def attend(self, inputs, global_query=None):
        batch, windows = ops.shape(inputs)[0], ops.shape(inputs)[1]
        tokens = self.window_size**2
        channels = self.num_heads * self.head_dim
        qkv = L._by_row_halves(lambda rows: L._call(self.qkv, rows), ops.reshape(inputs, (-1, channels)))
        if self.use_global_query:
            key, value = split(self, qkv, tokens, 2)
            if tile:
                query = ops.tile(global_query, (1, 1, windows, 1, 1))
            else:
                query = ops.broadcast_to(global_query, (self.num_heads, batch, windows, tokens, self.head_dim))
            query = ops.reshape(query, ops.shape(key))
        else:
            query, key, value = split(self, qkv, tokens, 3)
        attn = ops.matmul(query, ops.swapaxes(key, -1, -2))
        attn = attn * ops.cast(self.scale, attn.dtype) + self.relative_position_bias()
        return ops.softmax(attn, axis=-1), value
    return attend


batch, rounds = int(sys.argv[1]), int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype("float32")
runs = {}
for name, split, tile in [("slice+broadcast (old)", split_slices, False), ("unstack+broadcast", split_unstack, False),
                          ("slice+tile", split_slices, True), ("unstack+tile (new)", split_unstack, True)]:
    L.WindowAttention.attend = make_attend(split, tile)
    keras.utils.set_random_seed(0)
    model = GCViTTiny(weights=None)
    out = model.predict_on_batch(x); model.predict_on_batch(x)
    runs[name] = (model, out)
ref = runs["slice+broadcast (old)"][1]
times = {k: [] for k in runs}
for _ in range(rounds):
    for k, (m, _) in runs.items():
        t = time.perf_counter(); m.predict_on_batch(x); times[k].append(time.perf_counter() - t)
base = np.array(times["slice+broadcast (old)"])
for k, v in times.items():
    v = np.array(v)
    print(f"{k:24s} median {1000*np.median(v):7.1f} ms  paired speed vs old {np.median(base / v):.3f}  max|diff| {np.abs(runs[k][1]-ref).max():.1e}")
