"""A/B in one process: sublayers through `layers._call` (the default) or Keras' own call, on PyTorch.

Both variants run the same model object, alternating batch by batch, so machine
drift hits both alike; the first batches check that the outputs are identical and
count Keras `Layer.__call__` invocations per predict.

Usage: .venv/bin/python bench/torch_call_ab.py --batch 1 --rounds 25

It measured forms of the package before issue 29 (`tfgcvit.model.tuning`, `layers._call`,
`layers._by_row_halves`): run it on that tree, e.g. `git archive 96fbcf3 tfgcvit | tar -x -C DIR`
and PYTHONPATH=DIR.
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfgcvit.model import get_constructor  # noqa: E402
from tfgcvit.model import layers as gcvit_layers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shortcut = gcvit_layers._call
    variants = {"keras call": lambda layer, *a, **k: layer(*a, **k), "layers._call": shortcut}
    model = get_constructor(args.model)(weights=None)
    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)

    outputs, calls = {}, {}
    keras_call = keras.layers.Layer.__call__
    for name, function in variants.items():
        gcvit_layers._call = function
        model.predict_on_batch(x)
        count = [0]

        def counting(layer, *a, **k):
            count[0] += 1
            return keras_call(layer, *a, **k)

        keras.layers.Layer.__call__ = counting
        outputs[name] = model.predict_on_batch(x)
        keras.layers.Layer.__call__ = keras_call
        calls[name] = count[0]
    difference = float(np.max(np.abs(outputs["keras call"] - outputs["layers._call"])))

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, function in variants.items():
            gcvit_layers._call = function
            start = time.perf_counter()
            model.predict_on_batch(x)
            times[name].append(time.perf_counter() - start)
    gcvit_layers._call = shortcut
    print(f"GCViT-{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"max |difference| {difference:.1e}")
    for name in variants:
        print(f"  {name:13s} median {1000 * np.median(times[name]):7.1f} ms   min {1000 * min(times[name]):7.1f} ms"
              f"   Layer.__call__ per predict: {calls[name]}")


if __name__ == "__main__":
    main()
