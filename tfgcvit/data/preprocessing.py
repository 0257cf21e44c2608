"""Input normalisation and ImageNet label decoding (class names ship with the package)."""

import functools
import importlib.resources

import keras
import numpy as np
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Registered so that a `.keras` file with `layers.Lambda(preprocess_input)` loads
# without custom_objects.
@keras.saving.register_keras_serializable(package="tfgcvit")
def preprocess_input(x, data_format=None):
    """Normalises RGB images in [0, 255] with the ImageNet mean and std.

    Args:
        x: images (..., 3), channels last, RGB, values in [0, 255] of any
            integer or float dtype: a numpy array, a backend tensor or a Keras
            tensor (e.g. inside `keras.layers.Lambda`).
        data_format: only "channels_last" (or None) is supported.

    Returns:
        float32 images (x / 255 - mean) / std, same type of container as `x`
        for tensors; a numpy array for numpy or Python input.
    """
    if data_format not in (None, "channels_last"):
        raise ValueError(f"preprocess_input supports channels_last images only; got {data_format!r}.")
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if len(x.shape) == 0 or x.shape[-1] != 3:
        raise ValueError(
            f"preprocess_input expects RGB images with 3 channels last; got shape {tuple(x.shape)}."
        )
    mean = np.array(IMAGENET_MEAN, "float32") * 255.0
    std = np.array(IMAGENET_STD, "float32") * 255.0
    if isinstance(x, np.ndarray):
        return (x.astype("float32") - mean) / std
    x = ops.cast(x, "float32")
    return (x - mean) / std


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes as (synset id, names) pairs, in class-index order."""
    text = importlib.resources.files("tfgcvit").joinpath("data/imagenet_classes.txt").read_text()
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)


def decode_predictions(preds, top=5):
    """Decodes ImageNet-1k predictions like `keras.applications` does, offline.

    Args:
        preds: array (batch, 1000) of probabilities or logits.
        top: how many classes to return per image.

    Returns:
        One list per image of (synset id, class name, score) tuples, best first.
    """
    preds = np.asarray(ops.convert_to_numpy(preds) if not isinstance(preds, np.ndarray) else preds)
    classes = imagenet_classes()
    if preds.ndim != 2 or preds.shape[1] != len(classes):
        raise ValueError(
            f"decode_predictions expects a batch of ImageNet-1k predictions of shape "
            f"(batch, {len(classes)}); got {preds.shape}."
        )
    if not 1 <= top <= len(classes):
        raise ValueError(f"`top` must be between 1 and {len(classes)}; got {top}.")
    results = []
    for row in preds:
        best = np.argsort(-row, kind="stable")[:top]
        results.append(
            [(classes[i][0], classes[i][1].split(",")[0].strip().replace(" ", "_"), float(row[i]))
             for i in best]
        )
    return results
