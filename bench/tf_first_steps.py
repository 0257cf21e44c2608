"""Where the seconds before TensorFlow's first GCViT-Tiny prediction go, step by step.

import, build (random weights), tracing the model, the first run of the traced graph
(TensorFlow's graph optimisation and kernel set-up) and a second run. (Before issue 29 the
first trace also timed the row halves, `tfgcvit.model.tuning.row_halves_pay_off`.)

Usage: KERAS_BACKEND=tensorflow .venv/bin/python bench/tf_first_steps.py [BATCH]
"""
import json
import sys
import time

start = time.perf_counter()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfgcvit  # noqa: E402

steps = {"import": time.perf_counter() - start}
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1


def step(name, function):
    begin = time.perf_counter()
    result = function()
    steps[name] = time.perf_counter() - begin
    return result


model = step("build", lambda: tfgcvit.GCViTTiny(weights=None))
function = tf.function(lambda x: model(x, training=False))
concrete = step("trace", lambda: function.get_concrete_function(tf.TensorSpec((None, 224, 224, 3), tf.float32)))
x = tf.constant(np.zeros((batch, 224, 224, 3), "float32"))
step("first run", lambda: concrete(x).numpy())
step("second run", lambda: concrete(x).numpy())
print(json.dumps({name: round(seconds, 2) for name, seconds in steps.items()}))
