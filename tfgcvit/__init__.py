"""Keras 3 Global Context Vision Transformer (GC ViT), numerically identical to the official models.

The public names are imported lazily (PEP 562), so that the command line can
configure logging before TensorFlow and Keras load. The keras-hub classes
(`GCViTBackbone`, `GCViTImageClassifier`, ...) and the `gcvit_*` presets are
registered with keras-hub as soon as keras-hub is imported, before or after
tfgcvit, so `keras_hub.models.ImageClassifier.from_preset("gcvit_tiny_imagenet")`
works; keras-hub itself is never imported by `import tfgcvit`.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

__version__ = "3.0.0"


class _NoJaxOutsideItsBackend(importlib.abc.MetaPathFinder):
    """Keeps TensorFlow and Keras from importing JAX where the Keras backend is not JAX.

    With JAX installed (the `[test]` extras install it), TensorFlow 2.21 and
    Keras 3.15 import it at their own import although a TensorFlow or PyTorch
    process never uses it: `tensorflow/lite/python/util.py` (`from jax import
    jit`, used only by `TFLiteConverter.experimental_from_jax`) and
    `keras/src/callbacks/orbax_checkpoint.py` (a shim for old JAX versions).
    That costs about 140 MiB of resident memory. Both imports already handle a
    missing JAX, so this finder answers "not found" to them, and to them only:
    every other import of JAX, and these under the JAX backend, go through as
    usual. It acts when TensorFlow and Keras are imported after `tfgcvit` (as
    `tfgcvit.GCViT` and every submodule do); a process that imported them
    first has JAX loaded already.
    """

    IMPORTERS = ("tensorflow.lite.python.util", "keras.src.callbacks.orbax_checkpoint")

    def find_spec(self, name, path=None, target=None):
        if name != "jax" or _keras_backend() == "jax" or not self._imported_by_listed_module():
            return None
        raise ModuleNotFoundError(
            "tfgcvit keeps JAX out of processes whose Keras backend is not JAX", name=name
        )

    def _imported_by_listed_module(self):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") in self.IMPORTERS:
                return True
            frame = frame.f_back
        return False


def _keras_backend():
    """The Keras backend, read without importing Keras (or from it once loaded)."""
    config = sys.modules.get("keras.src.backend.config")
    if config is not None and hasattr(config, "backend"):
        return config.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


if not any(isinstance(finder, _NoJaxOutsideItsBackend) for finder in sys.meta_path):
    sys.meta_path.insert(0, _NoJaxOutsideItsBackend())

_EXPORTS = {
    "GCViT": "tfgcvit.model.gcvit",
    "GCViTXXTiny": "tfgcvit.model.gcvit",
    "GCViTXTiny": "tfgcvit.model.gcvit",
    "GCViTTiny": "tfgcvit.model.gcvit",
    "GCViTTiny2": "tfgcvit.model.gcvit",
    "GCViTSmall": "tfgcvit.model.gcvit",
    "GCViTSmall2": "tfgcvit.model.gcvit",
    "GCViTBase": "tfgcvit.model.gcvit",
    "GCViTLarge": "tfgcvit.model.gcvit",
    "GCViTLarge384": "tfgcvit.model.gcvit",
    "GCViTLarge512": "tfgcvit.model.gcvit",
    "GCViTNano": "tfgcvit.model.gcvit",
    "GCViTMicro": "tfgcvit.model.gcvit",
    "feature_extractor": "tfgcvit.model.gcvit",
    "GCViTBackbone": "tfgcvit.hub",
    "GCViTImageClassifier": "tfgcvit.hub",
    "GCViTImageClassifierPreprocessor": "tfgcvit.hub",
    "GCViTImageConverter": "tfgcvit.hub",
    "load_torch_weights": "tfgcvit.weights.mapping",
    "preprocess_input": "tfgcvit.data.preprocessing",
    "decode_predictions": "tfgcvit.data.preprocessing",
    # `tfgcvit.explain` is the module, `tfgcvit.explain_image` its main function.
    "explain_image": "tfgcvit.explain",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _register_with_keras_hub():
    try:
        importlib.import_module("tfgcvit.hub")
    except ImportError as error:  # e.g. a keras-hub too old for tfgcvit.hub
        warnings.warn(f"tfgcvit's GC ViT models are not registered with keras-hub: {error}", stacklevel=2)


class _AfterKerasHubImport(importlib.abc.MetaPathFinder):
    """Runs `_register_with_keras_hub` right after `keras_hub` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras_hub":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_with_keras_hub()

        spec.loader.exec_module = exec_module
        return spec


if sys.modules.get("keras_hub") is not None:
    _register_with_keras_hub()
elif importlib.util.find_spec("keras_hub") is not None:
    sys.meta_path.insert(0, _AfterKerasHubImport())
