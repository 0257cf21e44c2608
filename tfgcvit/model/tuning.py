"""Machine-specific tuning of the TensorFlow graph: decided from the machine, with an off switch.

GC ViT has two such tunings:

- on TensorFlow, dense layers on a few hundred rows run as two row halves at
  once (`tfgcvit.model.layers._by_row_halves`). Whether that pays off depends
  on the CPU, not only on its core count (`bench/row_split.py`: up to 1.44x
  faster per MLP on a 2-core Intel Xeon, 0.86-0.95x on a 2-core AMD EPYC at
  the same shapes, nothing to gain on one thread), so it is measured: the
  first trace that asks times GCViT-Tiny's batch-1 MLP shapes both ways on
  this machine, once per process (`row_halves_pay_off`);
- on JAX on CPU, the 3x3 depthwise convolutions run as nine shifted
  multiply-adds (`tfgcvit.model.layers._conv`): XLA's CPU grouped
  convolution is 13-48x slower at these shapes (`bench/depthwise.py`); on GPUs
  the convolution stays.

Each is decided when a model is traced (`tf.function`, `predict`, export),
not when it is built, from:

- the mode: `TFGCVIT_MACHINE_TUNING` in the environment ("1" or unset: auto,
  "0": off, "force": on whatever the machine), or `setting(mode)` /
  `disabled()` around the tracing code, which win over the environment;
- in "auto" mode, the machine: for the row halves, at least two threads
  TensorFlow computes with (its intra-op thread setting if one was made,
  otherwise the CPUs this process may run on), more than one inter-op thread
  and the measurement; for the depthwise form, JAX's default device.

Exported files never contain it, whatever the mode, since the machine that
serves a file is not the one that wrote it: `tfgcvit.export.export_model`
traces inside `disabled()`, and whatever Keras' own export code
(`model.export(...)`, `keras.export.ExportArchive`) traces is never tuned.
Functions traced before a change keep their graph.
"""

import contextlib
import functools
import os
import statistics
import sys
import time

ENV_VAR = "TFGCVIT_MACHINE_TUNING"
MODES = ("auto", "off", "on")
# Environment values and the mode each one selects.
ENV_VALUES = {"": "auto", "1": "auto", "auto": "auto", "0": "off", "off": "off", "force": "on"}
# What `row_halves_pay_off` measures: chains of GC ViT MLPs (C -> 3C -> C) on
# (rows, C) inputs, GCViT-Tiny's stages 2 and 3 at batch 1, where the split
# gained most on the machine it was first measured on; the halves must be this
# much faster, by the median of each round's ratio (paired within a round, so
# that the machine's drifts cancel). The whole model gains about a third of what
# the probe shows (Intel Xeon: 1.33-1.44x per MLP, 1.12x at batch 1); where the
# halves lose (an AMD EPYC Zen 4: 0.92-0.95x at batch 1) the probe's noise alone
# reached 0.99x by this measure (1.01x with 15 rounds) and 1.07x by the ratio of
# medians, hence a 10% margin.
PROBE_SHAPES = ((784, 128), (196, 256))
PROBE_BLOCKS = 4
PROBE_ROUNDS = 7
PROBE_MIN_SPEEDUP = 1.10

_modes = []  # stack of `setting` overrides, innermost last


def mode():
    """The tuning mode in force: "auto", "off" or "on".

    Raises:
        ValueError: `TFGCVIT_MACHINE_TUNING` holds an unknown value.
    """
    if _modes:
        return _modes[-1]
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in ENV_VALUES:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not understood; use 1 (auto), 0 (off) or force."
        )
    return ENV_VALUES[value]


@contextlib.contextmanager
def setting(new_mode):
    """Traces inside the block use `new_mode` ("auto", "off" or "on").

    Args:
        new_mode: "auto" decides from the machine, "off" never tunes, "on"
            tunes whatever the machine (for benchmarks and tests).

    Raises:
        ValueError: an unknown mode.
    """
    if new_mode not in MODES:
        raise ValueError(f"Unknown tuning mode {new_mode!r}; choose one of {', '.join(MODES)}.")
    _modes.append(new_mode)
    try:
        yield
    finally:
        _modes.pop()


def disabled():
    """Context manager: no machine-specific tuning in what is traced inside (exports)."""
    return setting("off")


def tensorflow_threads():
    """The threads TensorFlow's kernels compute with in this process.

    Its intra-op setting when one was made, otherwise the CPUs the process may
    run on (TensorFlow's own default; it follows `taskset` and cpusets, not CPU quotas).
    """
    import tensorflow as tf

    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def row_halves():
    """Whether dense layers traced now run as two row halves (TensorFlow only)."""
    import keras

    current = mode()
    if current == "off" or keras.backend.backend() != "tensorflow" or _traced_by_keras_export():
        return False
    if current == "on":
        return True
    import tensorflow as tf

    # The halves overlap on TensorFlow's inter-op threads: none to gain with one.
    serial = tf.config.threading.get_inter_op_parallelism_threads() == 1
    return not serial and tensorflow_threads() >= 2 and row_halves_pay_off()


@functools.cache
def row_halves_pay_off():
    """Whether two row halves at once beat whole matmuls on this machine; measured once per process.

    Times `PROBE_BLOCKS` MLP blocks at each of `PROBE_SHAPES` both ways, in
    `PROBE_ROUNDS` interleaved rounds (about half a second in all, at the
    first trace that asks), and says yes when, by the median of the rounds,
    the halves are at least `PROBE_MIN_SPEEDUP` times faster. Runs eagerly
    even when asked from inside a trace.
    """
    import numpy as np
    import tensorflow as tf
    from keras import ops

    rng = np.random.default_rng(0)

    def chain(rows, channels, halves):
        weights = [
            [tf.constant(rng.standard_normal(shape, dtype=np.float32) * 0.03)
             for shape in ((channels, 3 * channels), (3 * channels,), (3 * channels, channels), (channels,))]
            for _ in range(PROBE_BLOCKS)
        ]

        def mlp(x, w1, b1, w2, b2):
            hidden = ops.matmul(x, w1) + b1
            hidden = 0.5 * hidden * (1.0 + ops.erf(hidden * 0.7071067811865476))
            return ops.matmul(hidden, w2) + b2

        def forward(x):
            for block in weights:
                if halves:
                    half = rows // 2
                    x = x + ops.concatenate([mlp(x[:half], *block), mlp(x[half:], *block)], axis=0)
                else:
                    x = x + mlp(x, *block)
            return x

        return tf.function(forward)

    with tf.init_scope():
        runs = []
        for rows, channels in PROBE_SHAPES:
            x = tf.constant(rng.standard_normal((rows, channels), dtype=np.float32))
            for halves in (False, True):
                function = chain(rows, channels, halves)
                function(x).numpy()  # trace, then warm up
                function(x).numpy()
                runs.append((halves, function, x))
        speedups = []
        for round_index in range(PROBE_ROUNDS):
            totals = {False: 0.0, True: 0.0}
            for halves, function, x in runs if round_index % 2 else runs[::-1]:
                start = time.perf_counter()
                function(x).numpy()
                totals[halves] += time.perf_counter() - start
            speedups.append(totals[False] / totals[True])
    return statistics.median(speedups) >= PROBE_MIN_SPEEDUP


def shifted_depthwise():
    """Whether depthwise 3x3 convolutions traced now run as shifted multiply-adds (JAX on CPU)."""
    import keras

    current = mode()
    if current == "off" or keras.backend.backend() != "jax":
        return False
    if current == "on":
        return True
    import jax

    return jax.default_backend() == "cpu"


def _traced_by_keras_export():
    """Whether this trace runs inside Keras' export code (`model.export`, `ExportArchive`).

    Keras gives no hook around its exports, so the call stack is asked: the
    tracing happens synchronously inside those functions.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("keras.src.export"):
            return True
        frame = frame.f_back
    return False
