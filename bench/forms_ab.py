"""Issue 29's A/Bs: each alternative form of the model against its reference form, on the user path.

GCViT-Tiny (random weights, seeded), two models in one process: A with the
reference form, B with the alternative; each traced (TensorFlow, JAX) or run
(PyTorch) under its own switch, then `predict_on_batch` timed in interleaved
rounds (order reversed every other round). Reported: the median of the rounds'
paired ratios A/B (> 1: the form is faster) and their range.

The forms' switches are those of the package as of commit 96fbcf3, before issue
29 removed the forms that did not pay (`tfgcvit.model.tuning`, and the layers'
own functions, patched). Run it on that tree:

    git archive 96fbcf3 tfgcvit | tar -x -C /tmp/tree-96fbcf3
    PYTHONPATH=/tmp/tree-96fbcf3 KERAS_BACKEND=tensorflow .venv/bin/python bench/forms_ab.py \\
        --form row_halves --batch 1

Forms (backend): row_halves (tensorflow), layer_norm (tensorflow, jax),
shifted_depthwise (jax), sublayer_call (torch), channels_first_view (torch).
"""

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfgcvit  # noqa: E402
from tfgcvit.model import layers as L  # noqa: E402


@contextlib.contextmanager
def patched(owner, **replacements):
    saved = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def tuning(mode):
    from tfgcvit.model import tuning as module

    return module.setting(mode)


def _plain_conv(layer, x):
    return layer(x)


def _plain_max_pool(x):
    return keras.ops.max_pool(x, pool_size=3, strides=2, padding="valid")


# form: (reference context, alternative context), each a function returning a context manager.
FORMS = {
    "row_halves": (lambda: tuning("off"), lambda: tuning("on")),
    "layer_norm": (
        lambda: _stack(tuning("off"), patched(L.LayerNorm, call=keras.layers.LayerNormalization.call)),
        lambda: tuning("off")),
    "shifted_depthwise": (lambda: tuning("off"), lambda: tuning("on")),
    "sublayer_call": (lambda: patched(L, _call=lambda layer, *a, **k: layer(*a, **k)),
                      contextlib.nullcontext),
    "channels_first_view": (lambda: patched(L, _conv=_plain_conv, _max_pool_3x3_stride2=_plain_max_pool),
                            contextlib.nullcontext),
}


@contextlib.contextmanager
def _stack(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", choices=sorted(FORMS), required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="work per variant per round")
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    contexts = FORMS[args.form]
    models, per_call = [], []
    for context in contexts:
        keras.utils.set_random_seed(0)
        model = tfgcvit.GCViTTiny(weights=None, input_shape=(args.size, args.size, 3))
        with context():
            first = model.predict_on_batch(x)  # traced here, under this form
            start = time.perf_counter()
            model.predict_on_batch(x)
            per_call.append(time.perf_counter() - start)
        models.append(model)
        if len(models) == 2:
            np.testing.assert_allclose(first, reference, rtol=0, atol=1e-4)
        reference = first
    calls = max(1, round(args.seconds / max(per_call)))
    ratios, times = [], ([], [])
    for round_ in range(args.rounds):
        round_times = [0.0, 0.0]
        for i in (0, 1) if round_ % 2 == 0 else (1, 0):
            with contexts[i]():
                start = time.perf_counter()
                for _ in range(calls):
                    models[i].predict_on_batch(x)
                round_times[i] = (time.perf_counter() - start) / calls
            times[i].append(round_times[i])
        ratios.append(round_times[0] / round_times[1])
    median = [statistics.median(t) * 1e3 for t in times]
    print(f"{args.form}, {keras.backend.backend()}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.rounds} rounds x {calls} calls: reference {median[0]:.1f} ms, form {median[1]:.1f} ms; "
          f"reference/form {statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
