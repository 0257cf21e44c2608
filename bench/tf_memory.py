"""Peak resident memory of a TensorFlow-backend process running GCViT-Tiny at batch 8.

Builds GCViT-Tiny (random weights, 224x224), runs it three times in a
`tf.function` on standard normal images and prints which other frameworks are
loaded and the peak RSS (`ru_maxrss`). Run it in a fresh process per figure.

Usage (from the repository root):
    KERAS_BACKEND=tensorflow .venv/bin/python bench/tf_memory.py
    KERAS_BACKEND=tensorflow .venv/bin/python bench/tf_memory.py --jax-first   # JAX loaded, as before
    # an older revision: git archive REV tfgcvit | tar -x -C /tmp/rev; PYTHONPATH=/tmp/rev ...
"""

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jax-first", action="store_true",
                        help="import jax before tfgcvit, as TensorFlow 2.21 and Keras 3.15 did")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.jax_first:
        import jax  # noqa: F401
    import numpy as np

    import tfgcvit
    import tensorflow as tf

    model = tfgcvit.GCViTTiny(weights=None)
    x = tf.constant(np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32))
    run = tf.function(lambda t: model(t, training=False))
    for _ in range(3):
        start = time.perf_counter()
        run(x).numpy()
    loaded = [name for name in ("jax", "torch") if name in sys.modules]
    print(f"tfgcvit from {os.path.dirname(tfgcvit.__file__)}; other frameworks loaded: {loaded or 'none'}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"last batch {1e3 * (time.perf_counter() - start):.0f} ms")


if __name__ == "__main__":
    main()
