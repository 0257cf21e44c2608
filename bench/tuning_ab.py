"""GCViT-Tiny (random weights, 224x224) traced with the row halves forced on, off and "auto".

One process, one model, three `tf.function` traces under `tfgcvit.model.tuning.setting`,
timed in interleaved rounds (order reversed every other round), so the three
share the machine's drifts. "auto" is whatever `tfgcvit.model.tuning` decides here.

Usage (from the repository root):
    .venv/bin/python bench/tuning_ab.py --batch 1
    taskset -c 0 .venv/bin/python bench/tuning_ab.py --batch 1   # one CPU
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import tfgcvit  # noqa: E402  (before TensorFlow: keeps JAX out)
import tensorflow as tf  # noqa: E402
from tfgcvit.model import tuning  # noqa: E402

MODES = ("on", "off", "auto")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    model = tfgcvit.GCViTTiny(weights=None)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, 224, 224, 3), dtype=np.float32))
    functions = {}
    for mode in MODES:
        with tuning.setting(mode):
            functions[mode] = tf.function(lambda t: model(t, training=False))
            functions[mode](x)  # traced here, under this mode
    with tuning.setting("auto"):
        print(f"TensorFlow threads {tuning.tensorflow_threads()}, auto splits: {tuning.row_halves()}")
    times = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            for _ in range(2):
                start = time.perf_counter()
                functions[mode](x).numpy()
                times[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(values) * 1e3 for mode, values in times.items()}
    print(f"batch {args.batch}: " + ", ".join(f"{m} {v:.1f} ms" for m, v in median.items())
          + f"; halves speed-up (off/on) {median['off'] / median['on']:.2f}x")


if __name__ == "__main__":
    main()
