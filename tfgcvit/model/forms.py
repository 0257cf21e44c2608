"""Which form of a layer runs, chosen from the target the model is traced for.

Every layer of `tfgcvit.model.layers` has one reference form: the official
computation written with `keras.ops`. A second form stays only where a runtime
is measurably faster with it (at least 5% on the user path, in an interleaved
A/B: BENCHMARKS.md, "Reference core: forms and their A/Bs"), and it is chosen
here, from an explicit target only:

- the Keras backend;
- on JAX, the platform of JAX's default device;
- the export format being written: `exporting(format)` around the tracing code
  (`tfgcvit.export.export_model` enters it). A file is served elsewhere, so it
  gets no form chosen for the machine that writes it.

Nothing is timed and nothing else about the machine is read. The table:

| target                                          | form                                              |
|-------------------------------------------------|---------------------------------------------------|
| backend "jax", default device "cpu", no export  | 3x3 depthwise convolutions as nine shifted        |
|                                                 | multiply-adds (`layers._shifted_depthwise_conv`)  |
| backend "tensorflow" or "jax"                   | layer norms in fewer passes over the tensor       |
|                                                 | (`layers.LayerNorm`; also in exports, whose ONNX  |
|                                                 | rewrite fuses this form)                          |
| backend "torch"                                 | convolutions and the max-pool on a channels-first |
|                                                 | view (`layers._channels_first_view`)              |
| anything else                                   | the reference forms                               |

Forms are decided when a model is traced (`predict`, `tf.function`, `jax.jit`,
an export), so a function traced before a change keeps its graph.
"""

import contextlib

import keras

_exports = []  # formats of the exports being traced, innermost last


@contextlib.contextmanager
def exporting(format):
    """Context manager: what is traced inside is written to a file of `format` (reference forms)."""
    _exports.append(format)
    try:
        yield
    finally:
        _exports.pop()


def export_format():
    """The format of the export being traced ("onnx", "litert", ...), or None."""
    return _exports[-1] if _exports else None


def shifted_depthwise():
    """JAX on CPU, not exporting: XLA's CPU grouped convolution is 13-48x slower at GC ViT's shapes."""
    if keras.backend.backend() != "jax" or export_format() is not None:
        return False
    import jax

    return jax.default_backend() == "cpu"


def fewer_pass_layer_norm():
    """TensorFlow and JAX; PyTorch runs Keras' own norm as one fused kernel."""
    return keras.backend.backend() != "torch"


def channels_first_view():
    """PyTorch: Keras' channels-last convolution and pooling copy the tensor to channels-first and back."""
    return keras.backend.backend() == "torch"
