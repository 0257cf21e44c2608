"""What a GC ViT is, as data: the official variants, their limits, and their cost.

Every other module reads these facts from here: the model builders
(`tfgcvit.model.gcvit`, `tfgcvit.hub`), the weight mapping, the pretrained registry,
the command line and the benchmark. Parameter counts and FLOPs are computed
from the hyper-parameters by one analytic walk of the architecture
(`parameter_count`, `flop_count`), checked against the official table and
against the built models by the tests.
"""

import argparse
import numbers

NUM_STAGES = 4
# The network downsamples by 32; smaller images have no last-stage map.
MIN_SIZE = 32
# The largest input size the tools accept (--size, a custom config's "res", a preset's
# image size): 4x the 512 pixels of the largest official model. Activations grow with
# size ** 2 (at 2048, 16x those of the 512 model, 84x those at 224), and accuracy falls
# far from the trained size; a size beyond this is a typo rather than a plan (100000 grew
# to 8.7 GB and on).
MAX_INPUT_SIZE = 2048
LAYER_NORM_EPSILON = 1e-5
# FeatExtract pooling flags of each stage's global query generator: the official
# chain for every registered variant (56, 28, 14, 7 -> 7, 7, 14, 7 at 224).
QUERY_KEEP_DIMS = ((False, False, False), (False, False), (True,), (True,))

# ImageNet normalisation of the official checkpoints (timm's defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Without a registry entry for the weights, evaluate like timm's default test transform.
DEFAULT_CROP_PCT = 0.875

WEIGHTS_LICENSE_ID = "CC-BY-NC-SA-4.0"
WEIGHTS_LICENSE = (
    f"The official pretrained weights are released by NVIDIA under {WEIGHTS_LICENSE_ID} "
    "(non-commercial use only)."
)

# Official hyper-parameters (NVlabs/GCVit registrations). `weights` names the
# default pretrained checkpoint of each constructor.
VARIANTS = {
    "xxtiny": dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                   window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=None,
                   path_drop=0.2, input_size=224, weights="imagenet"),
    "xtiny": dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
                  window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=None,
                  path_drop=0.2, input_size=224, weights="imagenet"),
    "tiny": dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16),
                 window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=None,
                 path_drop=0.2, input_size=224, weights="imagenet"),
    "tiny2": dict(embed_dim=64, depths=(3, 4, 29, 5), num_heads=(2, 4, 8, 16),
                  window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=None,
                  path_drop=0.25, input_size=224, weights="imagenet"),
    "small": dict(embed_dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24),
                  window_size=(7, 7, 14, 7), mlp_ratio=2.0, layer_scale=1e-5,
                  path_drop=0.3, input_size=224, weights="imagenet"),
    "small2": dict(embed_dim=96, depths=(3, 4, 23, 5), num_heads=(3, 6, 12, 24),
                   window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=1e-5,
                   path_drop=0.35, input_size=224, weights="imagenet"),
    "base": dict(embed_dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32),
                 window_size=(7, 7, 14, 7), mlp_ratio=2.0, layer_scale=1e-5,
                 path_drop=0.5, input_size=224, weights="imagenet"),
    "large": dict(embed_dim=192, depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48),
                  window_size=(7, 7, 14, 7), mlp_ratio=2.0, layer_scale=1e-5,
                  path_drop=0.5, input_size=224, weights="imagenet"),
    "large_384": dict(embed_dim=192, depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48),
                      window_size=(12, 12, 24, 12), mlp_ratio=2.0, layer_scale=1e-5,
                      path_drop=0.1, input_size=384, weights="imagenet21k"),
    "large_512": dict(embed_dim=192, depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48),
                      window_size=(16, 16, 32, 16), mlp_ratio=2.0, layer_scale=1e-5,
                      path_drop=0.1, input_size=512, weights="imagenet21k"),
}
ALIASES = {"nano": "xxtiny", "micro": "xtiny"}
# The hyper-parameters that make a variant (the rest are training settings).
ARCHITECTURE_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "layer_scale")


# The official code's argument names for the architecture (its JSON configs, e.g.
# tests/data/fixtures/custom_224_config.json), with ours.
OFFICIAL_ARGUMENT_NAMES = {"dim": "embed_dim", "depths": "depths", "num_heads": "num_heads",
                           "window_size": "window_size", "mlp_ratio": "mlp_ratio", "layer_scale": "layer_scale"}


def architecture(variant):
    """The architecture hyper-parameters (`ARCHITECTURE_KEYS`) of an official variant or alias."""
    config = VARIANTS[variant_name(variant)]
    return {key: config[key] for key in ARCHITECTURE_KEYS}


def architecture_from_official_arguments(arguments):
    """Our architecture hyper-parameters from the official code's (`dim`, `depths`, ...).

    Raises:
        ValueError: a key is missing; the message names the keys needed.
    """
    missing = [name for name in OFFICIAL_ARGUMENT_NAMES if name not in arguments]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (a GC ViT architecture needs "
                         f"{', '.join(OFFICIAL_ARGUMENT_NAMES)})")
    return {ours: arguments[theirs] for theirs, ours in OFFICIAL_ARGUMENT_NAMES.items()}


def variant_name(variant):
    """The official variant name for a name or alias ("Tiny", "large-384", "nano")."""
    key = str(variant).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in VARIANTS:
        raise ValueError(
            f"Unknown GC ViT variant {variant!r}; choose one of {', '.join(VARIANTS)} "
            f"(aliases: {', '.join(ALIASES)})."
        )
    return key


def find_variant(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale, exact=False):
    """The official variant with these hyper-parameters, or None.

    An exact match wins; otherwise (unless `exact`) a variant that differs only
    in its window sizes (e.g. GC ViT-T at 384 with windows 12/12/24/12), whose
    weights load with the relative-position bias tables resized. `layer_scale`
    may be the initial value or just True/False (as read from a checkpoint).
    """
    def same_but_windows(config):
        return (config["embed_dim"] == embed_dim
                and tuple(config["depths"]) == tuple(depths)
                and tuple(config["num_heads"]) == tuple(num_heads)
                and float(config["mlp_ratio"]) == float(mlp_ratio)
                and (config["layer_scale"] is None) == (layer_scale is None or layer_scale is False))

    candidates = [name for name, config in VARIANTS.items() if same_but_windows(config)]
    for name in candidates:
        if tuple(VARIANTS[name]["window_size"]) == tuple(window_size):
            return name
    return None if exact or not candidates else candidates[0]


def check_window_size(window_size):
    """`window_size` as a tuple of NUM_STAGES positive ints, or a clear ValueError."""
    if not isinstance(window_size, (list, tuple)) or not all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size
    ):
        raise ValueError(
            f"`window_size` must be {NUM_STAGES} positive integers, one per stage, "
            f"e.g. (7, 7, 14, 7); got {window_size!r}."
        )
    window_size = tuple(int(w) for w in window_size)
    if len(window_size) != NUM_STAGES or min(window_size) < 1:
        raise ValueError(
            f"`window_size` must be {NUM_STAGES} positive integers, one per stage; got {window_size}."
        )
    return window_size


def check_architecture(embed_dim, depths, num_heads, window_size):
    """Validates the hyper-parameters of a GC ViT before anything is built.

    Returns:
        (depths, num_heads, window_size) as tuples of ints.
    """
    window_size = check_window_size(window_size)
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != NUM_STAGES or len(num_heads) != NUM_STAGES:
        raise ValueError(
            f"`depths` and `num_heads` need {NUM_STAGES} entries each; got {depths} and {num_heads}."
        )
    if not isinstance(embed_dim, numbers.Integral) or isinstance(embed_dim, bool) or embed_dim < 1:
        raise ValueError(f"`embed_dim` must be a positive integer; got {embed_dim!r}.")
    for stage, heads in enumerate(num_heads):
        channels = embed_dim * 2**stage
        if heads < 1 or channels % heads:
            raise ValueError(
                f"Stage {stage} has {channels} channels (embed_dim * 2**{stage}), which are "
                f"not divisible by its {heads} heads; choose num_heads that divide the channels."
            )
    if min(depths) < 1:
        raise ValueError(f"Every stage needs at least one block; got depths {depths}.")
    return depths, num_heads, window_size


def check_image_shape(image_shape, pretrained=False):
    """Validates (height, width, channels); None sizes mean any size."""
    image_shape = tuple(image_shape)
    if len(image_shape) != 3:
        raise ValueError(
            f"The image shape must be (height, width, channels) without the batch "
            f"dimension, e.g. (224, 224, 3); got {image_shape}."
        )
    height, width, channels = image_shape
    if channels is None or channels < 1:
        raise ValueError(f"The channel dimension of the image shape must be known; got {image_shape}.")
    if pretrained and channels != 3:
        raise ValueError(
            f"Pretrained weights expect RGB inputs with 3 channels; the image shape "
            f"{image_shape} has {channels}. Use random weights (weights=None, or "
            f"load_weights=False with from_preset) to train on {channels}-channel images."
        )
    for name, size in (("height", height), ("width", width)):
        if size is not None and size < MIN_SIZE:
            raise ValueError(
                f"Input {name} {size} is below the minimum of {MIN_SIZE} pixels "
                f"(the network downsamples by 32). Resize or pad the images."
            )
    return image_shape


# Analytic cost -----------------------------------------------------------------


def _half(n):
    # A 3x3 stride-2 conv or max-pool with padding 1.
    return (n - 1) // 2 + 1


def _mbconv(h, w, c):
    """(parameters, multiply-adds) of the residual fused MBConv on an h x w x c map."""
    squeezed = int(c * 0.25)
    params = 9 * c + 2 * c * squeezed + c * c
    return params, h * w * 9 * c + 2 * c * squeezed + h * w * c * c


def _reduce_size(h, w, c, c_out):
    params, macs = _mbconv(h, w, c)
    params += 2 * c + 9 * c * c_out + 2 * c_out
    return params, macs + _half(h) * _half(w) * 9 * c * c_out


def _walk(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale, height, width, classes):
    """(parameters, multiply-adds per image) of a GC ViT, stage by stage.

    Parameters are what the official code counts (no `relative_position_index`
    buffers) and what Keras' `count_params()` gives. Multiply-adds count
    convolutions, dense layers and the two attention matmuls (not the
    element-wise work), with windows on the padded map as the model computes them.
    """
    channels = embed_dim
    h, w = _half(height), _half(width)
    params, macs = 27 * channels + channels, h * w * 27 * channels  # stem conv with bias
    p, m = _reduce_size(h, w, channels, channels)
    params, macs = params + p, macs + m
    h, w = _half(h), _half(w)
    for stage in range(NUM_STAGES):
        c, ws, heads = channels, window_size[stage], num_heads[stage]
        qh, qw = h, w
        for keep in QUERY_KEEP_DIMS[stage]:
            p, m = _mbconv(qh, qw, c)
            params, macs = params + p, macs + m
            if not keep:
                qh, qw = _half(qh), _half(qw)
        padded = (-(-h // ws) * ws) * (-(-w // ws) * ws)
        hidden = int(c * mlp_ratio)
        for block in range(depths[stage]):
            # Even blocks are local attention (q, k, v), odd ones global (k, v only).
            projections = 3 if block % 2 == 0 else 2
            params += 4 * c  # norm1, norm2
            params += c * projections * c + projections * c + (2 * ws - 1) ** 2 * heads
            params += c * c + c + c * hidden + hidden + hidden * c + c  # proj, MLP
            params += 2 * c if layer_scale is not None else 0
            macs += padded * c * (projections + 1) * c + 2 * padded * ws * ws * c + 2 * h * w * c * hidden
        if stage < NUM_STAGES - 1:
            p, m = _reduce_size(h, w, c, 2 * c)
            params, macs = params + p, macs + m
            h, w, channels = _half(h), _half(w), 2 * c
    params += 2 * channels  # final norm
    if classes:
        params += channels * classes + classes
        macs += channels * classes
    return params, macs


def parameter_count(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale, classes=1000):
    """The number of weights of a GC ViT, without building it (the large ones take minutes).

    Args:
        embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale: as
            for `tfgcvit.GCViT`.
        classes: classes of the head; 0 for a model without head.

    Returns:
        The parameter count, an int.
    """
    return _walk(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale,
                 MIN_SIZE, MIN_SIZE, classes)[0]


def flop_count(config, height, width, classes=1000):
    """FLOPs of one image through a GC ViT: multiply-adds times two (GFLOP = 1e9 of them).

    Args:
        config: a `VARIANTS` entry or any dict with the `ARCHITECTURE_KEYS`.
        height, width: input size.
        classes: classes of the head.

    Returns:
        FLOPs per image (float).
    """
    architecture = {key: config[key] for key in ARCHITECTURE_KEYS}
    return 2.0 * _walk(**architecture, height=height, width=width, classes=classes)[1]


def check_input_size(size, what):
    """Returns `size`, or raises ValueError unless the tools can serve it (MIN_SIZE..MAX_INPUT_SIZE)."""
    if not MIN_SIZE <= size <= MAX_INPUT_SIZE:
        raise ValueError(
            f"{what} {size} is outside {MIN_SIZE}..{MAX_INPUT_SIZE}: the network downsamples by {MIN_SIZE}, "
            f"and beyond {MAX_INPUT_SIZE} (4x the largest official model's 512) memory grows with size^2 "
            "to many GB per image"
        )
    return size


def whole_number(text):
    """The int written in ASCII digits, or None (int() also reads "١", and str.isdigit() passes "²")."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:  # over Python's 4300 digits
        return None


def input_size_argument(text):
    """argparse type of every --size option: `argument --size: MESSAGE` on bad input.

    argparse names the type function in its message for a ValueError ("invalid
    input_size_argument value: 'abc'"); an ArgumentTypeError gives the message alone.
    """
    size = whole_number(text)
    if size is None:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels, {MIN_SIZE}..{MAX_INPUT_SIZE}; got {text!r}")
    try:
        return check_input_size(size, "size")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
