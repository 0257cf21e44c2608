"""GC ViT in keras-hub: backbone, image classifier, its preprocessor and image converter, presets.

`GCViTBackbone` is a `keras_hub.models.FeaturePyramidBackbone` built by the same
`tfgcvit.model.gcvit.gcvit_graph` as the Keras Applications constructors, so the
official weight mapping (`tfgcvit.load_torch_weights`) works on it unchanged.
Its `pyramid_outputs` P2..P5 are the stage outputs (strides 4..32), which
keras-hub's detection and segmentation task models consume.

The eleven official checkpoints are keras-hub presets named
`gcvit_<variant>_<imagenet|imagenet21k>`. The first `from_preset(name)` fetches
the official checkpoint through tfgcvit's safe path (published sha256, cache,
`TFGCVIT_MIRROR`, no pickle execution), converts it and writes a standard
preset directory under `<cache>/presets/<name>`; later calls load that
directory. Importing this module (`import tfgcvit.hub`, or the first use of
`tfgcvit.GCViTBackbone` and the other keras-hub names) registers the classes and
presets with keras-hub; `import tfgcvit` alone does not.
"""

import json
import os
import sys

import h5py
import keras

try:
    import keras_hub
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f"tfgcvit's keras-hub models need keras-hub ({error}): pip install \"tfgcvit[hub]\" "
        "(keras-hub needs Python >= 3.11 and keras >= 3.15)."
    ) from None

from tfgcvit.weights import download
from tfgcvit.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS,
    WEIGHTS_LICENSE_ID,
    architecture,
    check_architecture,
    check_image_shape,
    parameter_count,
)
from tfgcvit.model.gcvit import gcvit_graph
from tfgcvit.weights.pretrained import official_checkpoints, pretrained_state_dict
from tfgcvit.weights.mapping import load_torch_weights

PACKAGE = "tfgcvit"
# The files of a keras-hub preset directory that `from_preset` reads.
PRESET_CONFIG_FILES = ("config.json", "metadata.json", "task.json", "preprocessor.json",
                       "image_converter.json")
PRESET_WEIGHTS_FILE = "model.weights.h5"
TASK_WEIGHTS_FILE = "task.weights.h5"  # a classifier's head
# All that `save_to_preset` writes for a GC ViT model: a folder holding nothing else may be replaced.
PRESET_FILES = frozenset((*PRESET_CONFIG_FILES, PRESET_WEIGHTS_FILE, TASK_WEIGHTS_FILE))


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTBackbone(keras_hub.models.FeaturePyramidBackbone):
    """Global Context Vision Transformer backbone (Hatamizadeh et al., arXiv 2206.09959).

    Inputs are RGB images normalised with the ImageNet mean and std (what
    `GCViTImageConverter` and `tfgcvit.preprocess_input` produce), of any size
    of at least 32 pixels; where a stage's map is not a multiple of its window
    the blocks pad it, as the official detection backbone does.

    Args:
        embed_dim: channels after the stem; they double at every stage.
        depths: blocks in each of the four stages.
        num_heads: attention heads in each stage.
        window_size: window size of each stage, e.g. (7, 7, 14, 7).
        mlp_ratio: MLP hidden width as a multiple of the channels.
        layer_scale: initial value of the per-channel residual scales, or None.
        qkv_bias: whether the query/key/value projections have a bias.
        drop_rate: dropout after the stem, the attention projections and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly to this at the last block.
        image_shape: (height, width, channels); None sizes allow any size.
        dtype: dtype policy of the layers (e.g. "mixed_bfloat16").

    Example:
    ```python
    backbone = tfgcvit.GCViTBackbone.from_preset("gcvit_tiny_imagenet")
    features = keras.Model(backbone.inputs, backbone.pyramid_outputs)
    features(images)  # {"P2": (B, H/4, W/4, 64), ..., "P5": (B, H/32, W/32, 512)}
    ```
    """

    def __init__(
        self,
        embed_dim,
        depths,
        num_heads,
        window_size,
        mlp_ratio=3.0,
        layer_scale=None,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        image_shape=(None, None, 3),
        dtype=None,
        **kwargs,
    ):
        depths, num_heads, window_size = check_architecture(embed_dim, depths, num_heads, window_size)
        image_shape = check_image_shape(image_shape)

        # The arguments that make the network, as the graph builder takes them.
        architecture = dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                            mlp_ratio=mlp_ratio, layer_scale=layer_scale, qkv_bias=qkv_bias, drop_rate=drop_rate,
                            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)

        # === Functional model ===
        images = keras.Input(shape=image_shape, name="images")
        stages, features = gcvit_graph(images, dtype=dtype, **architecture)
        super().__init__(inputs=images, outputs=features, dtype=dtype, **kwargs)

        # === Config ===
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.layer_scale = layer_scale
        self.qkv_bias = qkv_bias
        self.drop_rate = drop_rate
        self.attn_drop_rate = attn_drop_rate
        self.drop_path_rate = drop_path_rate
        self.image_shape = image_shape
        self.pyramid_outputs = {f"P{i + 2}": stage for i, stage in enumerate(stages)}

    @property
    def pyramid_outputs(self):
        # A plain dict: Keras keeps attributes as TrackedDicts, which a JAX
        # `predict` cannot return (`keras.Model(backbone.input, backbone.pyramid_outputs)`).
        return dict(keras_hub.models.FeaturePyramidBackbone.pyramid_outputs.fget(self) or {})

    @pyramid_outputs.setter
    def pyramid_outputs(self, value):
        keras_hub.models.FeaturePyramidBackbone.pyramid_outputs.fset(self, value)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "depths": list(self.depths),
                "num_heads": list(self.num_heads),
                "window_size": list(self.window_size),
                "mlp_ratio": self.mlp_ratio,
                "layer_scale": self.layer_scale,
                "qkv_bias": self.qkv_bias,
                "drop_rate": self.drop_rate,
                "attn_drop_rate": self.attn_drop_rate,
                "drop_path_rate": self.drop_path_rate,
                "image_shape": list(self.image_shape),
            }
        )
        return config

    def load_weights(self, filepath, *args, **kwargs):
        """Keras' `load_weights`, with one clear error for a wrong input channel count or file."""
        check_image_shape(self.image_shape, pretrained=True)
        _load_weights_file(super().load_weights, filepath, *args, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        _check_preset(cls, preset, kwargs, load_weights)
        return super().from_preset(preset, load_weights=load_weights, **kwargs)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTImageConverter(keras_hub.layers.ImageConverter):
    """Resizes images to the checkpoint's input size and normalises them like ImageNet.

    Defaults: bicubic with antialiasing (Pillow's bicubic in timm's test
    transform), the largest centred crop of the target aspect ratio, then
    (pixel / 255 - mean) / std with ImageNet's mean and std. Inputs are RGB
    pixels in [0, 255]. The official checkpoints with crop_pct 1.0 and
    centre crops (tiny, base, large) see what timm's test transform gives them
    up to resampling; those evaluated at crop_pct 0.875 see the whole centre
    square rather than its central 87.5%: for exact official evaluation use
    `tfgcvit evaluate` or `tfgcvit.data.images.evaluation_transform`.
    """

    backbone_cls = GCViTBackbone

    def __init__(self, image_size=None, scale=None, offset=None, interpolation="bicubic", antialias=True, **kwargs):
        if scale is None and offset is None:
            scale = [1.0 / (255.0 * s) for s in IMAGENET_STD]
            offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            interpolation=interpolation,
            antialias=antialias,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTImageClassifierPreprocessor(keras_hub.models.ImageClassifierPreprocessor):
    """The preprocessor of `GCViTImageClassifier`: a `GCViTImageConverter`."""

    backbone_cls = GCViTBackbone
    image_converter_cls = GCViTImageConverter

    def load_preset_assets(self, preset):
        # keras-hub's generic `ImageClassifier.from_preset` calls this before it loads the weights,
        # and nothing else of ours with the preset: without task.weights.h5 it would give the
        # classifier a random head, silently. (A preprocessor loaded alone from such a broken
        # preset is refused too.)
        super().load_preset_assets(preset)
        if os.path.isdir(preset):
            check_preset_directory(preset, task=True)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTImageClassifier(keras_hub.models.ImageClassifier):
    """GC ViT image classifier: `GCViTBackbone`, average pooling, a dense head (logits by default).

    Its `head` is the official head: `tfgcvit.load_torch_weights` fills backbone
    and head from an official or timm checkpoint.

    Example:
    ```python
    classifier = tfgcvit.GCViTImageClassifier.from_preset("gcvit_tiny_imagenet")
    classifier.predict(pixels)  # uint8 RGB images of any size -> (B, 1000) logits
    ```
    """

    backbone_cls = GCViTBackbone
    preprocessor_cls = GCViTImageClassifierPreprocessor

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        _check_preset(cls, preset, kwargs, load_weights)
        return super().from_preset(preset, load_weights=load_weights, **kwargs)

    def load_task_weights(self, filepath):
        """keras-hub's `load_task_weights`, with one clear error for a truncated or mismatched file."""
        _load_weights_file(super().load_task_weights, filepath)


# Errors that name what is wrong ---------------------------------------------------


def _load_weights_file(load, filepath, *args, **kwargs):
    """Runs Keras' `load_weights`, turning an unreadable or mismatched file into one clear error."""
    try:
        return load(filepath, *args, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"Cannot load the weights file {os.fspath(filepath)}: {' '.join(str(error).split())[:300]}. "
            "It must be a Keras weights file of this architecture (e.g. from "
            "`tfgcvit convert SRC --preset DIR` or `save_to_preset`)."
        ) from None


def _check_preset(cls, preset, kwargs, load_weights):
    """Clear errors before keras-hub's: unknown names, broken preset directories, wrong channels."""
    if not isinstance(preset, str):
        raise ValueError(f"A preset is a name or a directory path (a string); got {type(preset).__name__}.")
    if load_weights and kwargs.get("image_shape") is not None:
        check_image_shape(kwargs["image_shape"], pretrained=True)
    if os.path.isdir(preset):
        check_preset_directory(preset, task=issubclass(cls, keras_hub.models.Task))
    elif "://" not in preset and preset not in cls.presets:
        raise ValueError(
            f"Unknown GC ViT preset {preset!r}. The presets are: {', '.join(sorted(PRESETS))}; "
            "or pass the path of a preset directory (`tfgcvit convert SRC --preset DIR` writes one)."
        )


def check_preset_directory(directory, task=False):
    """Raises one clear error naming the first missing or corrupt file of a preset directory.

    Args:
        directory: a keras-hub preset directory.
        task: check what a classifier needs too: a preset with task.json must
            hold its head's weights, task.weights.h5 (keras-hub would
            otherwise give it a random head).
    """
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"{config} is missing: {directory} is not a keras-hub preset directory "
            "(`tfgcvit convert SRC --preset DIR` writes one)."
        )
    for name in PRESET_CONFIG_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is corrupt (not readable JSON: {error}); write the preset again.") from None
    weights = [PRESET_WEIGHTS_FILE]
    if task and os.path.exists(os.path.join(directory, "task.json")):
        weights.append(TASK_WEIGHTS_FILE)
    for name in weights:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing from the preset directory {directory}; "
                                    "write the preset again.")
        try:
            h5py.File(path, "r").close()  # reads the superblock: a truncated file fails here
        except OSError as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"{path} is truncated or corrupt, not a whole HDF5 weights file ({reason}); "
                             "write the preset again.") from None


def check_preset_destination(directory, overwrite=False):
    """Raises FileExistsError unless `save_preset` may write `directory`.

    It may where nothing is (not even a broken symbolic link), and with
    `overwrite` over a folder that holds only preset files, or nothing: no
    other file is ever deleted.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        kind = "a file" if os.path.exists(directory) else "a broken symbolic link"
        raise FileExistsError(f"{directory} exists and is {kind}, not a preset folder; choose another name")
    here = os.path.realpath(os.getcwd())
    if os.path.commonpath([here, os.path.realpath(directory)]) == os.path.realpath(directory):
        raise FileExistsError(f"{directory} holds the current folder; choose another name")
    with os.scandir(directory) as entries:
        foreign = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries
                         if entry.name not in PRESET_FILES or entry.is_dir())
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{directory} exists and is not a preset folder (it holds {shown}); "
                              "choose another name")
    if not overwrite:
        raise FileExistsError(f"{directory} exists; pass --overwrite (overwrite=True) to replace it")


# Presets --------------------------------------------------------------------------


def preset_name(variant, pretrain):
    """`gcvit_<variant>_<pretrain>`, e.g. gcvit_large_384_imagenet21k."""
    return f"gcvit_{variant}_{pretrain}"


def backbone_arguments(variant):
    """The `GCViTBackbone` arguments of an official variant."""
    return dict(architecture(variant), drop_path_rate=VARIANTS[variant]["path_drop"])


def build_classifier(backbone_arguments, num_classes, image_size, crop_mode="center", state_dict=None):
    """A `GCViTImageClassifier` with its preprocessor, optionally loaded from a PyTorch state dict.

    Args:
        backbone_arguments: `GCViTBackbone` arguments.
        num_classes: classes of the head.
        image_size: the checkpoint's input size (square).
        crop_mode: "center" (keep the aspect ratio, centre crop) or "squash".
        state_dict: official or timm layout, or None for random weights.
    """
    converter = GCViTImageConverter(
        image_size=(image_size, image_size), crop_to_aspect_ratio=crop_mode == "center"
    )
    classifier = GCViTImageClassifier(
        backbone=GCViTBackbone(**backbone_arguments),
        num_classes=num_classes,
        preprocessor=GCViTImageClassifierPreprocessor(image_converter=converter),
    )
    if state_dict is not None:
        load_torch_weights(classifier, state_dict)
    return classifier


def save_preset(model, directory, overwrite=False):
    """Writes `model.save_to_preset` into `directory` atomically: all files, or none.

    The files are written to a temporary sibling folder which then replaces
    `directory` (`download.replaced_atomically`); one writer at a time
    (`download.FileLock`). An interrupted or failed write leaves nothing.

    Args:
        model: a keras-hub backbone or task.
        directory: the preset folder to write.
        overwrite: replace an existing preset folder (or empty folder). Any
            other existing entry is refused (`check_preset_destination`).

    Raises:
        FileExistsError: `directory` exists and may not be replaced.
        OSError: it cannot be written; the message names `directory` and why.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    check_preset_destination(directory, overwrite)
    # model.weights.h5 and task.weights.h5 (the head) hold each weight once; a file and the JSON more.
    needed = download.weights_file_bytes(model.weights) + 2 * 65536
    download.check_free_space(directory, needed, what=f"the preset {directory}")
    try:
        os.makedirs(parent, exist_ok=True)
        with download.FileLock(os.path.join(parent, "." + name), remove=True):
            check_preset_destination(directory, overwrite)  # again: another writer may have finished
            with download.replaced_atomically(directory, folder=True) as temporary:
                model.save_to_preset(temporary)
    except FileExistsError:
        raise
    except OSError as error:
        # The error names the hidden temporary folder, or nothing (HDF5's): name the destination.
        reason = os.strerror(error.errno) if error.errno else " ".join(str(error).split())
        raise OSError(f"cannot write the preset {directory}: {reason}") from None
    return directory


def _is_complete_preset(directory):
    try:
        check_preset_directory(directory, task=True)
    except (OSError, ValueError):
        return False
    return True


def official_preset_directory(name):
    """The local preset directory of an official preset, converted on first use.

    Raises:
        ValueError: unknown name.
        tfgcvit.weights.download.DownloadError: the checkpoint cannot be downloaded.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown GC ViT preset {name!r}. The presets are: {', '.join(sorted(PRESETS))}.")
    directory = os.path.join(download.cache_dir(), "presets", name)
    if _is_complete_preset(directory):
        return directory
    record = PRESETS[name]["record"]
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    with download.FileLock(directory):  # one conversion at a time; a waiting process finds the result
        if not _is_complete_preset(directory):  # absent, or damaged: written again
            state = pretrained_state_dict(record["variant"], record["pretrain"])
            classifier = build_classifier(
                backbone_arguments(record["variant"]), 1000, record["input_size"], record["crop_mode"], state
            )
            save_preset(classifier, directory, overwrite=True)
            sys.stderr.write(f"tfgcvit: wrote the keras-hub preset {name} to {directory}.\n")
    return directory


class _OfficialPreset(dict):
    """A keras-hub preset entry whose handle is a local directory, made when first asked for.

    keras-hub reads `entry["kaggle_handle"]` only when a preset is loaded, so
    listing the presets downloads nothing.
    """

    def __getitem__(self, key):
        if key == "kaggle_handle":
            return official_preset_directory(self["name"])
        return super().__getitem__(key)


def _official_presets():
    presets = {}
    for record in official_checkpoints():
        variant, pretrain = record["variant"], record["pretrain"]
        trained = ("ImageNet-1k" if pretrain == "imagenet"
                   else "ImageNet-21k and fine-tuned on ImageNet-1k")
        name = preset_name(variant, pretrain)
        presets[name] = _OfficialPreset(
            name=name,
            record=record,
            metadata={
                "description": (
                    f"GC ViT-{variant} pre-trained on {trained} at {record['input_size']}x"
                    f"{record['input_size']} by NVIDIA (official weights, ImageNet top-1 "
                    f"{record['top1']}%), converted from the official checkpoint on first use."
                ),
                "params": parameter_count(**architecture(variant), classes=0),
                "path": "gcvit",
                "license": WEIGHTS_LICENSE_ID,
            },
            kaggle_handle=f"tfgcvit://{name}",
        )
    return presets


PRESETS = _official_presets()
# keras-hub has no public name for registering presets of a model it does not ship.
from keras_hub.src.utils.preset_utils import register_presets  # noqa: E402

register_presets(PRESETS, GCViTBackbone)
