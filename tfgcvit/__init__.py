"""Keras 3 Global Context Vision Transformer (GC ViT), numerically identical to the official models."""

from tfgcvit.model import (
    GCViT,
    GCViTBase,
    GCViTLarge,
    GCViTLarge384,
    GCViTLarge512,
    GCViTMicro,
    GCViTNano,
    GCViTSmall,
    GCViTSmall2,
    GCViTTiny,
    GCViTTiny2,
    GCViTXTiny,
    GCViTXXTiny,
    feature_extractor,
)
from tfgcvit.preprocessing import decode_predictions, preprocess_input
from tfgcvit.weights import load_torch_weights

__version__ = "3.0.0"

__all__ = [
    "GCViT",
    "GCViTXXTiny",
    "GCViTXTiny",
    "GCViTTiny",
    "GCViTTiny2",
    "GCViTSmall",
    "GCViTSmall2",
    "GCViTBase",
    "GCViTLarge",
    "GCViTLarge384",
    "GCViTLarge512",
    "GCViTNano",
    "GCViTMicro",
    "feature_extractor",
    "load_torch_weights",
    "preprocess_input",
    "decode_predictions",
]
