"""GC ViT models: one generic builder and one thin constructor per official variant."""

import numpy as np
import keras
from keras import layers

from tfgcvit.layers import GCViTLevel, PatchEmbed, ReduceSize

MIN_SIZE = 32
NUM_STAGES = 4
# FeatExtract pooling flags of each stage's global query generator: the official
# chain for every registered variant (56, 28, 14, 7 -> 7, 7, 14, 7 at 224).
QUERY_KEEP_DIMS = ((False, False, False), (False, False), (True,), (True,))

WEIGHTS_LICENSE = (
    "The official pretrained weights are released by NVIDIA under CC-BY-NC-SA-4.0 "
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


def _is_pretrained(weights):
    return isinstance(weights, str) and weights in ("imagenet", "imagenet21k")


def _check_input_shape(input_shape, default_size, weights):
    if input_shape is None:
        return (default_size, default_size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels) without the batch "
            f"dimension, e.g. (224, 224, 3); got {input_shape}."
        )
    height, width, channels = input_shape
    if channels is None or channels < 1:
        raise ValueError(f"The channel dimension of `input_shape` must be known; got {input_shape}.")
    if weights is not None and channels != 3:
        raise ValueError(
            f"Pretrained weights expect RGB inputs with 3 channels; `input_shape` "
            f"has {channels}. Pass weights=None to train from scratch on "
            f"{channels}-channel images."
        )
    for name, size in (("height", height), ("width", width)):
        if size is not None and size < MIN_SIZE:
            raise ValueError(
                f"Input {name} {size} is below the minimum of {MIN_SIZE} pixels "
                f"(the network downsamples by 32). Resize or pad the images."
            )
    return input_shape


def _check_window_size(window_size):
    if not isinstance(window_size, (list, tuple)) or not all(
        isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window_size
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


def GCViT(
    window_size,
    embed_dim,
    depths,
    num_heads,
    drop_rate=0.0,
    mlp_ratio=3.0,
    qkv_bias=True,
    qk_scale=None,
    attn_drop=0.0,
    path_drop=0.1,
    layer_scale=None,
    model_name="gcvit",
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    default_size=224,
):
    """Instantiates a Global Context Vision Transformer.

    Reference: Hatamizadeh et al., "Global Context Vision Transformers",
    ICML 2023 (arXiv 2206.09959). The computation is that of the official
    PyTorch code (NVlabs/GCVit); inputs are channels-last RGB images normalised
    with `tfgcvit.preprocess_input`.

    Args:
        window_size: window size of each of the four stages, e.g. (7, 7, 14, 7).
        embed_dim: channels after the stem; they double at every stage.
        depths: number of blocks in each stage.
        num_heads: attention heads in each stage.
        drop_rate: dropout rate after attention projections and in the MLPs.
        mlp_ratio: MLP hidden width as a multiple of the channels.
        qkv_bias: whether query/key/value projections have a bias.
        qk_scale: overrides the attention scale head_dim ** -0.5.
        attn_drop: dropout rate on the attention probabilities.
        path_drop: maximum stochastic depth rate, reached linearly at the last block.
        layer_scale: initial value of the per-channel residual scales, or None.
        model_name: name of the Keras model.
        include_top: whether to include the classification head.
        weights: None (random initialisation), "imagenet", "imagenet21k", a path
            (`.weights.h5`, or an official / timm `.pth`, `.pth.tar`,
            `.safetensors` checkpoint) or an http(s) URL of such a file.
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: (height, width, channels); None dimensions give a model
            for variable image sizes. Defaults to (default_size, default_size, 3).
        pooling: with include_top=False, None returns the normalised last
            feature map (B, h, w, C); "avg" or "max" pools it to (B, C).
        classes: number of classes of the head.
        classifier_activation: activation of the head (a name, callable or None).
        default_size: native input size of the configuration.

    Returns:
        A `keras.Model`.
    """
    window_size = _check_window_size(window_size)
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != NUM_STAGES or len(num_heads) != NUM_STAGES:
        raise ValueError(
            f"`depths` and `num_heads` need {NUM_STAGES} entries each; got {depths} and {num_heads}."
        )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'; got {pooling!r}.")
    if weights is not None and not isinstance(weights, str):
        raise ValueError(
            "`weights` must be None, 'imagenet', 'imagenet21k', a file path or an "
            f"http(s) URL; got an object of type {type(weights).__name__}."
        )
    if _is_pretrained(weights) and include_top:
        if classes != 1000:
            raise ValueError(
                f"With weights={weights!r} and include_top=True, `classes` must be "
                f"1000 (the ImageNet head); got {classes}. Use include_top=False "
                f"and add your own head to classify {classes} classes."
            )
        if classifier_activation not in (None, "softmax"):
            raise ValueError(
                "With pretrained weights and include_top=True, `classifier_activation` "
                f"must be None or 'softmax'; got {classifier_activation!r}."
            )
    if input_tensor is not None and not keras.backend.is_keras_tensor(input_tensor):
        raise ValueError(
            "`input_tensor` must be a Keras tensor such as the output of "
            f"`keras.Input(...)`; got an object of type {type(input_tensor).__name__}. "
            "To run the model on data, build it first and call it on the data."
        )
    if input_tensor is not None:
        tensor_shape = tuple(input_tensor.shape[1:])
        if input_shape is not None and tuple(input_shape) != tensor_shape:
            raise ValueError(
                f"`input_shape` {tuple(input_shape)} differs from the shape of "
                f"`input_tensor` {tensor_shape}; pass only one of them."
            )
        input_shape = tensor_shape
    input_shape = _check_input_shape(input_shape, default_size, weights)

    if input_tensor is None:
        image = layers.Input(shape=input_shape, name="image")
    else:
        image = input_tensor

    # Stem and stages.
    x = PatchEmbed(embed_dim, name="patch_embed")(image)
    x = layers.Dropout(drop_rate, name="pos_drop")(x)
    path_drops = np.linspace(0.0, path_drop, sum(depths)).tolist()
    for i in range(NUM_STAGES):
        x = GCViTLevel(
            depth=depths[i],
            num_heads=num_heads[i],
            window_size=window_size[i],
            keep_dims=QUERY_KEEP_DIMS[i],
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop,
            path_drop=path_drops[sum(depths[:i]) : sum(depths[: i + 1])],
            layer_scale=layer_scale,
            name=f"levels_{i}",
        )(x)
        if i < NUM_STAGES - 1:
            x = ReduceSize(keep_dim=False, name=f"levels_{i}_downsample")(x)
    x = layers.LayerNormalization(epsilon=1e-5, name="norm")(x)

    # Head. It runs in float32 under mixed precision for a stable softmax.
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, name="head", dtype="float32")(x)
        x = layers.Activation(classifier_activation, name="predictions", dtype="float32")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    inputs = image if input_tensor is None else keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, x, name=model_name)

    if weights is not None:
        from tfgcvit.weights import load_weights

        variant = find_variant(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale)
        load_weights(model, weights, variant=variant)
    return model


def find_variant(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale):
    """The official variant with these hyper-parameters, or None.

    An exact match wins; otherwise a variant that differs only in its window sizes
    (e.g. GC ViT-T at 384 with windows 12/12/24/12), whose weights load with the
    relative-position bias tables resized.
    """
    wanted = (embed_dim, tuple(depths), tuple(num_heads), float(mlp_ratio), layer_scale)
    same_but_windows = [
        name
        for name, config in VARIANTS.items()
        if (config["embed_dim"], config["depths"], config["num_heads"],
            config["mlp_ratio"], config["layer_scale"]) == wanted
    ]
    for name in same_but_windows:
        if VARIANTS[name]["window_size"] == tuple(window_size):
            return name
    return same_but_windows[0] if same_but_windows else None


def feature_extractor(model):
    """A model from the same input to the four stage outputs before each downsample.

    Args:
        model: a model built by `GCViT` or a variant constructor.

    Returns:
        A `keras.Model` whose output is a dict with keys "stage0".."stage3":
        strides 4, 8, 16, 32 and channels embed_dim * (1, 2, 4, 8).
    """
    try:
        outputs = {f"stage{i}": model.get_layer(f"levels_{i}").output for i in range(NUM_STAGES)}
    except ValueError as error:
        raise ValueError(
            f"`feature_extractor` needs a GC ViT model with layers levels_0..levels_3; "
            f"model {model.name!r} has none ({error})."
        ) from None
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_features")


def _variant(variant, doc_name):
    config = VARIANTS[variant]

    def constructor(
        include_top=True,
        weights=config["weights"],
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        name=f"gcvit_{variant}",
        **kwargs,
    ):
        return GCViT(
            window_size=kwargs.pop("window_size", config["window_size"]),
            embed_dim=config["embed_dim"],
            depths=config["depths"],
            num_heads=config["num_heads"],
            mlp_ratio=config["mlp_ratio"],
            layer_scale=config["layer_scale"],
            path_drop=kwargs.pop("path_drop", config["path_drop"]),
            model_name=kwargs.pop("model_name", name),
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            default_size=config["input_size"],
            **kwargs,
        )

    constructor.__name__ = doc_name
    constructor.__qualname__ = doc_name
    constructor.__doc__ = f"""Instantiates GC ViT-{variant} ({doc_name}).

    embed_dim {config['embed_dim']}, depths {config['depths']}, heads
    {config['num_heads']}, windows {config['window_size']}, native input
    {config['input_size']}x{config['input_size']}. By default loads the
    official {config['weights']!r} weights, converted on first use and cached.
    {WEIGHTS_LICENSE}

    Args:
        include_top: whether to include the 1000-class ImageNet head.
        weights: None, "imagenet", "imagenet21k", a local checkpoint path or a URL.
        input_tensor: optional Keras tensor to use as the model input.
        input_shape: (height, width, 3); None dimensions allow any size >= 32.
        pooling: None, "avg" or "max" when include_top=False.
        classes: number of classes (1000 with pretrained weights and a head).
        classifier_activation: activation of the head.
        name: model name.
        **kwargs: other `GCViT` arguments (drop_rate, attn_drop, path_drop,
            window_size, qk_scale).

    Returns:
        A `keras.Model`.
    """
    return constructor


GCViTXXTiny = _variant("xxtiny", "GCViTXXTiny")
GCViTXTiny = _variant("xtiny", "GCViTXTiny")
GCViTTiny = _variant("tiny", "GCViTTiny")
GCViTTiny2 = _variant("tiny2", "GCViTTiny2")
GCViTSmall = _variant("small", "GCViTSmall")
GCViTSmall2 = _variant("small2", "GCViTSmall2")
GCViTBase = _variant("base", "GCViTBase")
GCViTLarge = _variant("large", "GCViTLarge")
GCViTLarge384 = _variant("large_384", "GCViTLarge384")
GCViTLarge512 = _variant("large_512", "GCViTLarge512")
# Names of the original tfgcvit port.
GCViTNano = _variant("xxtiny", "GCViTNano")
GCViTMicro = _variant("xtiny", "GCViTMicro")

CONSTRUCTORS = {
    "xxtiny": GCViTXXTiny,
    "xtiny": GCViTXTiny,
    "tiny": GCViTTiny,
    "tiny2": GCViTTiny2,
    "small": GCViTSmall,
    "small2": GCViTSmall2,
    "base": GCViTBase,
    "large": GCViTLarge,
    "large_384": GCViTLarge384,
    "large_512": GCViTLarge512,
}


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


def get_constructor(variant):
    """The constructor for a variant name ("tiny", "large_384", or an alias like "nano")."""
    return CONSTRUCTORS[variant_name(variant)]
