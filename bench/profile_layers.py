"""Per-layer time of a GC ViT forward pass on any Keras backend and inference path.

Each top-level layer of the model (stem, every stage, every downsample, the
head) becomes a model of its own, fed the output the previous layers produce,
and is timed through the same inference path `tfgcvit.benchmark` uses. A stage
is also split into its global query generator, its local blocks and its global
blocks. Time is the median of `--repeats` calls, interleaved layer by layer so
that machine drift hits all layers alike.

Usage (from the repository root):
    KERAS_BACKEND=tensorflow .venv/bin/python bench/profile_layers.py --path function
    KERAS_BACKEND=jax .venv/bin/python bench/profile_layers.py --path jit
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfgcvit.benchmark import _make_runner, choose_path  # noqa: E402
from tfgcvit.model.gcvit import get_constructor  # noqa: E402


def sub_models(model):
    """(name, keras.Model, input shape) for each part of the forward pass."""
    parts = []
    for layer in model.layers[1:]:
        if isinstance(layer, keras.layers.Dropout):
            continue
        shape = tuple(layer.input.shape)
        if type(layer).__name__ == "GCViTLevel":
            inputs = keras.Input(shape[1:])
            parts.append((f"{layer.name}/q_global_gen", keras.Model(
                inputs, layer.q_global_gen(inputs)), shape))
            for kind, use_global in (("local", False), ("global", True)):
                blocks = [b for b in layer.blocks if b.use_global_query == use_global]
                if not blocks:
                    continue
                inputs = keras.Input(shape[1:])
                query = keras.Input((1, layer.num_heads, layer.window_size**2, layer.head_dim))
                outputs = inputs
                for block in blocks:
                    outputs = block(outputs, global_query=query)
                parts.append((f"{layer.name}/{len(blocks)} {kind} blocks",
                              _QueryModel(keras.Model([inputs, query], outputs), query.shape),
                              shape))
        else:
            inputs = keras.Input(shape[1:])
            parts.append((layer.name, keras.Model(inputs, layer(inputs)), shape))
    return parts


class _QueryModel:
    """Marks a sub-model that takes a (random) global query as a second input."""

    def __init__(self, model, query_shape):
        self.model, self.query_shape = model, query_shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--path", default=None, help="inference path (see tfgcvit.benchmark)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # Each part is its own tf.function: TensorFlow's retracing warnings do not apply.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    backend = keras.backend.backend()
    path = choose_path(backend, path=args.path)
    model = get_constructor(args.model)(weights=None, input_shape=(args.size, args.size, 3))
    rng = np.random.default_rng(0)
    runners = []
    for name, sub, shape in sub_models(model):
        x = rng.standard_normal((args.batch_size, *shape[1:]), dtype=np.float32)
        if isinstance(sub, _QueryModel):
            query = rng.standard_normal((args.batch_size, *sub.query_shape[1:]), dtype=np.float32)
            run, device_x = _make_runner(sub.model, backend, path, [x, query])
        else:
            run, device_x = _make_runner(sub, backend, path, x)
        start = time.perf_counter()
        run(device_x)
        compile_s = time.perf_counter() - start
        run(device_x)
        runners.append((name, run, device_x, compile_s))

    times = {name: [] for name, *_ in runners}
    for _ in range(args.repeats):
        for name, run, device_x, _ in runners:
            start = time.perf_counter()
            run(device_x)
            times[name].append(time.perf_counter() - start)

    total = sum(np.median(t) for t in times.values())
    print(f"## GCViT-{args.model}, batch {args.batch_size}, {args.size}x{args.size}, "
          f"{backend} ({path})\n")
    print("| part | input | ms | share | first call s |\n|---|---|---|---|---|")
    for name, _, device_x, compile_s in runners:
        ms = np.median(times[name]) * 1e3
        shape = "x".join(str(d) for d in _shape_of(device_x)[1:])
        print(f"| {name} | {shape} | {ms:.1f} | {100 * ms / (total * 1e3):.1f}% | {compile_s:.1f} |")
    print(f"| (sum) | | {total * 1e3:.1f} | 100% | |")


def _shape_of(x):
    x = x[0] if isinstance(x, (list, tuple)) else x
    return tuple(x.shape)


if __name__ == "__main__":
    main()
