"""Exporting GC ViT models for serving: TensorFlow SavedModel, ONNX and TFLite (LiteRT).

`export_model` is a thin layer over Keras' `Model.export` that checks, before
any tracing starts, that the requested combination works for GC ViT, and says
what to do instead when it does not. What works (and is tested):

| format           | backends          | dynamic batch | dynamic height/width |
|------------------|-------------------|---------------|----------------------|
| "tf_saved_model" | tensorflow, jax   | yes           | yes                  |
| "onnx"           | tensorflow        | yes           | yes                  |
| "litert"         | tensorflow        | yes           | yes (resize the input tensor) |

Dynamic height/width need a model built with `input_shape=(None, None, 3)`.
Exports are traced without machine-specific tuning (`tfgcvit.model.tuning.disabled()`),
so a file runs the same graph wherever it is served. Keras' own
`model.export(path, format="onnx")` works too (after one call of the model);
wrap it in `tfgcvit.model.tuning.disabled()` to keep the tuning out of the file.
`quantize_onnx` writes an int8 (dynamic quantisation) copy of an ONNX file.
The model weights are backend-independent: to export from a JAX or PyTorch
session, save them (`model.save_weights("m.weights.h5")`), rebuild the same
model under `KERAS_BACKEND=tensorflow`, load them and export there.
"""

import keras
import numpy as np

from tfgcvit.model import tuning

FORMATS = ("tf_saved_model", "onnx", "litert")
# Backends on which each format exports GC ViT (checked in tests/test_export.py).
BACKENDS = {
    "tf_saved_model": ("tensorflow", "jax"),
    "onnx": ("tensorflow",),
    "litert": ("tensorflow",),
}
# Why the other backends are not offered, shown in the error.
UNSUPPORTED_REASONS = {
    ("tf_saved_model", "torch"): "Keras cannot write a TensorFlow SavedModel from PyTorch",
    ("onnx", "jax"): ("Keras' JAX path needs the separate jax2onnx converter and its flax, "
                      "equinox and optax dependencies, not installed with tfgcvit nor tested"),
    ("onnx", "torch"): ("Keras' PyTorch path (torch.onnx) fails on GC ViT's dynamic window "
                        "shapes and has no dynamic batch"),
    ("litert", "jax"): "Keras has no LiteRT exporter for JAX",
    ("litert", "torch"): "Keras' PyTorch path needs litert-torch and fixes every shape",
}
# Keyword arguments accepted per format (besides input_signature and verbose).
OPTIONS = {
    "tf_saved_model": ("is_static", "jax2tf_kwargs"),
    "onnx": ("opset_version",),
    # TFLite converter attributes, passed through; Keras rejects unknown ones.
    "litert": None,
}
# The oldest ONNX opset tested with GC ViT (tf2onnx's default is newer).
MIN_ONNX_OPSET = 13
MIN_SIZE = 32


def _check_float32(model, format):
    dtypes = {layer.compute_dtype for layer in model._flatten_layers(include_self=False)
              if hasattr(layer, "compute_dtype")}
    dtypes.discard("float32")
    if dtypes and format != "tf_saved_model":
        raise ValueError(
            f"Export to {format!r} needs a float32 model, but layers of {model.name!r} compute "
            f"in {sorted(dtypes)} (a mixed-precision policy). Rebuild the model under "
            "keras.mixed_precision.set_global_policy('float32'), copy the weights with "
            "`model32.set_weights(model.get_weights())` and export that; to shrink the file, "
            "quantise at conversion instead (e.g. format='litert' with "
            "optimizations=[tf.lite.Optimize.DEFAULT])."
        )


def _check_signature(model, input_signature):
    if input_signature is None:
        return
    specs = input_signature if isinstance(input_signature, (list, tuple)) else [input_signature]
    if len(specs) != 1:
        raise ValueError(
            f"GC ViT has one image input; `input_signature` has {len(specs)} entries."
        )
    shape = tuple(specs[0].shape)
    channels = model.inputs[0].shape[-1]
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(
            f"`input_signature` must describe (batch, height, width, {channels}) images; "
            f"got shape {shape}."
        )
    for name, size, built in zip(("height", "width"), shape[1:3], model.inputs[0].shape[1:3]):
        if size is not None and size < MIN_SIZE:
            raise ValueError(f"`input_signature` {name} {size} is below the minimum of {MIN_SIZE}.")
        if built is not None and size != built:
            raise ValueError(
                f"`input_signature` {name} {size} differs from the model's fixed input {name} "
                f"{built}. For other or variable sizes build the model with "
                "input_shape=(None, None, 3) and copy the weights."
            )


def _run_once(model):
    """Runs the model on one zero image: Keras' ONNX exporter refuses never-called models."""
    spec = model.inputs[0]
    shape = [1] + [64 if size is None else size for size in spec.shape[1:]]
    model(np.zeros(shape, dtype=spec.dtype), training=False)


def export_model(model, path, format="tf_saved_model", input_signature=None, verbose=False,
                 **kwargs):
    """Exports a GC ViT model (or a model built on one) for inference.

    Args:
        model: a built Keras model, e.g. from `tfgcvit.GCViT` or a fine-tuned
            model containing one.
        path: output path: a directory for "tf_saved_model", a file (".onnx",
            ".tflite") otherwise.
        format: "tf_saved_model", "onnx" or "litert" (TFLite).
        input_signature: optional single `keras.InputSpec` / `tf.TensorSpec`
            (batch, height, width, channels); defaults to the model's input,
            keeping its None dimensions dynamic.
        verbose: print Keras' export messages.
        **kwargs: format options: "onnx": `opset_version` (>= 13);
            "tf_saved_model" on JAX: `jax2tf_kwargs`, `is_static`;
            "litert": TFLite converter attributes such as `optimizations`.

    Returns:
        `path`.

    Raises:
        ValueError: an unknown format, a backend that cannot export this
            format, a mixed-precision model for ONNX/LiteRT, an input signature
            that does not fit the model, or an unknown or invalid option.
    """
    backend = keras.backend.backend()
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if backend not in BACKENDS[format]:
        reason = UNSUPPORTED_REASONS.get((format, backend), "not supported")
        raise ValueError(
            f"Exporting GC ViT to {format!r} works on the {' or '.join(BACKENDS[format])} "
            f"backend, not {backend!r} ({reason}). The weights are backend-independent: "
            "save them with model.save_weights('model.weights.h5'), rebuild the model "
            "with KERAS_BACKEND=tensorflow, load them and export there."
        )
    allowed = OPTIONS[format]
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for format {format!r}; accepted: "
                f"{', '.join(allowed) or 'none'}."
            )
    if not model.built or not model.inputs:
        raise ValueError("Build the model (give it an input shape) before exporting it.")
    _check_float32(model, format)
    _check_signature(model, input_signature)
    if not getattr(model, "_called", True):
        _run_once(model)

    if format == "onnx":
        opset = kwargs.get("opset_version")
        if opset is not None and (not isinstance(opset, int) or opset < MIN_ONNX_OPSET):
            raise ValueError(
                f"`opset_version` must be an integer >= {MIN_ONNX_OPSET} (the oldest opset "
                f"tested with GC ViT); got {opset!r}."
            )
    if format == "tf_saved_model" and backend == "jax":
        # jax2tf would also serialise gradients, which fails on the random-seed
        # state of the dropout layers; serving needs none.
        jax2tf_kwargs = dict(kwargs.pop("jax2tf_kwargs", None) or {})
        jax2tf_kwargs.setdefault("with_gradient", False)
        kwargs["jax2tf_kwargs"] = jax2tf_kwargs

    # The machine that serves the file is not this one: no tuning for it.
    with tuning.disabled():
        model.export(str(path), format=format, verbose=verbose, input_signature=input_signature,
                     **kwargs)
    return path


def quantize_onnx(path, output_path, per_channel=True):
    """Int8 dynamic quantisation of an exported ONNX file, for ONNX Runtime.

    The weights of every MatMul and Conv are stored as int8 and activations are
    quantised as the model runs (`onnxruntime.quantization.quantize_dynamic`).
    It costs accuracy: check it on your own data. On the test fixture
    (BENCHMARKS.md, "Deployment") top-1 agreed with float32 on all 8 images
    tried, while logits (up to 2.5 in size) moved by up to 0.23.

    Args:
        path: a float32 ONNX file, e.g. from `export_model(..., format="onnx")`.
        output_path: where to write the quantised file.
        per_channel: one scale per output channel (more accurate) rather than
            one per tensor.

    Returns:
        `output_path`.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    import os

    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ONNX file at {str(path)!r}; export one first.")
    quantize_dynamic(str(path), str(output_path), per_channel=per_channel,
                     weight_type=QuantType.QInt8)
    return output_path
