"""Keras 3 Global Context Vision Transformer (GC ViT), numerically identical to the official models.

The public names are imported lazily (PEP 562), so that the command line can
configure logging before TensorFlow and Keras load.
"""

import importlib

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
    "load_torch_weights": "tfgcvit.weights",
    "preprocess_input": "tfgcvit.preprocessing",
    "decode_predictions": "tfgcvit.preprocessing",
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
