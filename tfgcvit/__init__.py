"""Keras 3 Global Context Vision Transformer (GC ViT), numerically identical to the official models.

The public names are imported lazily (PEP 562), so that the command line can
configure logging before TensorFlow and Keras load. `import tfgcvit` changes
nothing outside the package (no import hooks). The keras-hub classes
(`GCViTBackbone`, `GCViTImageClassifier`, ...) and the `gcvit_*` presets are
registered with keras-hub when `tfgcvit.hub` is imported: by `import tfgcvit.hub`,
or by the first use of one of those names; after that
`keras_hub.models.ImageClassifier.from_preset("gcvit_tiny_imagenet")` works.
"""

import importlib

__version__ = "3.0.0"


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
