"""Machine-specific tuning of the TensorFlow graph: decided from the machine, with an off switch.

GC ViT has two such tunings:

- on TensorFlow, dense layers on a few hundred rows run as two row halves at
  once (`tfgcvit.model.layers._by_row_halves`), which pays off where TensorFlow
  has exactly two threads (measured: up to 1.44x faster per MLP on 2 cores, no
  gain on 1; `bench/row_split.py`, BENCHMARKS.md);
- on JAX on CPU, the 3x3 depthwise convolutions run as nine shifted
  multiply-adds (`tfgcvit.model.layers._conv`): XLA's CPU grouped
  convolution is 13-48x slower at these shapes (`bench/depthwise.py`); on GPUs
  the convolution stays.

Each is decided when a model is traced (`tf.function`, `predict`, export),
not when it is built, from:

- the mode: `TFGCVIT_MACHINE_TUNING` in the environment ("1" or unset: auto,
  "0": off, "force": on whatever the machine), or `setting(mode)` /
  `disabled()` around the tracing code, which win over the environment;
- in "auto" mode, the machine: for the row halves the threads TensorFlow
  computes with (its intra-op thread setting if one was made, otherwise the
  CPUs this process may run on); for the depthwise form, JAX's default device.

Exported files never contain it, whatever the mode, since the machine that
serves a file is not the one that wrote it: `tfgcvit.export.export_model`
traces inside `disabled()`, and whatever Keras' own export code
(`model.export(...)`, `keras.export.ExportArchive`) traces is never tuned.
Functions traced before a change keep their graph.
"""

import contextlib
import os
import sys

ENV_VAR = "TFGCVIT_MACHINE_TUNING"
MODES = ("auto", "off", "on")
# Environment values and the mode each one selects.
ENV_VALUES = {"": "auto", "1": "auto", "auto": "auto", "0": "off", "off": "off", "force": "on"}
# TensorFlow thread counts at which the row halves were measured to pay off
# (2 threads: 1.1-1.44x per MLP; 1 thread: none, the halves run one after the other).
ROW_HALVES_THREADS = (2,)

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
    return not serial and tensorflow_threads() in ROW_HALVES_THREADS


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
