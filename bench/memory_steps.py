"""Resident memory after each step of a batch-8 prediction: import, build, predict.

Runs in either environment, to split a peak-RSS difference between TensorFlow
itself and the model:
    KERAS_BACKEND=tensorflow .venv/bin/python bench/memory_steps.py ours
    .venv-seed/bin/python bench/memory_steps.py seed      # the original port, TF 2.12
(from a folder where this checkout's `tfgcvit` does not shadow the seed's, e.g.
`cd /tmp && .../.venv-seed/bin/python /path/to/bench/memory_steps.py seed`).
"""

import sys

import numpy as np


def memory():
    """(current, peak) resident memory in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                name, kib = line.split()[:2]
                values[name.rstrip(":")] = int(kib) // 1024
    return values["VmRSS"], values["VmHWM"]


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "ours"
    if which == "ours":
        import tfgcvit  # noqa: F401  (first, as users do: it keeps JAX out of TensorFlow processes)
    import tensorflow as tf

    print(f"import tensorflow {tf.__version__}: rss {memory()[0]} MiB, jax loaded: {'jax' in sys.modules}")
    x = np.random.default_rng(0).standard_normal((8, 224, 224, 3), dtype=np.float32)
    if which == "ours":
        from tfgcvit.model import get_constructor

        model = get_constructor("tiny")(weights=None)
    else:
        import tfgcvit

        model = tfgcvit.GCViTTiny(weights=None, input_shape=(224, 224, 3))
    print(f"model built: rss {memory()[0]} MiB")
    for i in range(4):
        model.predict_on_batch(x)
        print(f"predict_on_batch {i + 1}: rss %d MiB, peak %d MiB" % memory())


if __name__ == "__main__":
    main()
