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
import sys
import warnings

__version__ = "3.0.0"

_EXPORTS = {
    "GCViT": "tfgcvit.model",
    "GCViTXXTiny": "tfgcvit.model",
    "GCViTXTiny": "tfgcvit.model",
    "GCViTTiny": "tfgcvit.model",
    "GCViTTiny2": "tfgcvit.model",
    "GCViTSmall": "tfgcvit.model",
    "GCViTSmall2": "tfgcvit.model",
    "GCViTBase": "tfgcvit.model",
    "GCViTLarge": "tfgcvit.model",
    "GCViTLarge384": "tfgcvit.model",
    "GCViTLarge512": "tfgcvit.model",
    "GCViTNano": "tfgcvit.model",
    "GCViTMicro": "tfgcvit.model",
    "feature_extractor": "tfgcvit.model",
    "GCViTBackbone": "tfgcvit.hub",
    "GCViTImageClassifier": "tfgcvit.hub",
    "GCViTImageClassifierPreprocessor": "tfgcvit.hub",
    "GCViTImageConverter": "tfgcvit.hub",
    "load_torch_weights": "tfgcvit.weights",
    "preprocess_input": "tfgcvit.preprocessing",
    "decode_predictions": "tfgcvit.preprocessing",
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
