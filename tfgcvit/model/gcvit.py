"""GC ViT models: one graph builder, the Keras Applications front door, feature extraction.

`gcvit_graph` lays out the network (stem, four stages, their downsamples,
final norm) once; `GCViT` and the per-variant constructors (`GCViTTiny`, ...)
put an optional preprocessing layer before it and a head after it, and
`tfgcvit.GCViTBackbone` (keras-hub) wraps the same graph. The hyper-parameters
of the official variants live in `tfgcvit.config`.
"""

import numpy as np
import keras
from keras import layers

from tfgcvit.config import (  # noqa: F401  (re-exported: the public home of the variants)
    ALIASES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_SIZE,
    NUM_STAGES,
    QUERY_KEEP_DIMS,
    VARIANTS,
    WEIGHTS_LICENSE,
    check_architecture,
    check_image_shape,
    find_variant,
    variant_name,
)
from tfgcvit.model.layers import (
    LAYER_NORM_EPSILON,
    PACKAGE,
    GCViTLevel,
    NumpyGlorotUniform,
    PatchEmbed,
    ReduceSize,
)
from tfgcvit.weights.pretrained import PRETRAIN_NAMES, load_weights

def _is_pretrained(weights):
    return isinstance(weights, str) and weights in PRETRAIN_NAMES


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImageSizeCheck(layers.Layer):
    """Refuses images under `MIN_SIZE` pixels high or wide where their size is known as the model runs.

    A fixed `input_shape` is checked when the model is built; a model for any size
    (None height or width) is checked here, on the sizes the running model sees:
    eager calls, JAX and PyTorch (which see every size), and TensorFlow's `predict`
    and `fit` for the first size they trace. A graph traced for any size (an exported
    file, or TensorFlow's `predict` / `fit` once Keras retraced them for a second size)
    sees None and cannot check: keras.ops has no assertion, and the network computes on
    any size from 1 pixel on (each stride-2 step rounds up), so there a too-small image
    gets a meaningless answer (docs/input_limits.md).
    """

    def __init__(self, **kwargs):
        # Passes the images through unchanged, in their own dtype.
        super().__init__(autocast=False, **kwargs)

    def call(self, images):
        # A size that is not a number (JAX's symbolic dimensions when jax2tf exports for
        # any size) is unknown here, like TensorFlow's None.
        check_image_shape(tuple(size if isinstance(size, int) else None for size in images.shape[1:]))
        return images

    def compute_output_shape(self, input_shape):
        return input_shape


def gcvit_graph(
    images,
    embed_dim,
    depths,
    num_heads,
    window_size,
    mlp_ratio=3.0,
    layer_scale=None,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.1,
    dtype=None,
):
    """Applies the GC ViT network to a Keras tensor of normalised images.

    The layer names mirror the official state dict (`patch_embed`,
    `levels_{i}`, `levels_{i}_downsample`, `norm`), which is what
    `tfgcvit.load_torch_weights` maps.

    Args:
        images: a Keras tensor (batch, height, width, channels).
        embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale,
            qkv_bias, qk_scale: the architecture (see `GCViT`).
        drop_rate: dropout after the stem, the attention projections and in the MLPs.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly to this at the last block.
        dtype: dtype policy of every layer (None: the global policy).

    Returns:
        (stages, features): the four stage outputs before each downsample
        (strides 4, 8, 16, 32; channels embed_dim * 1, 2, 4, 8) and the final
        normalised feature map.
    """
    block_options = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                         attn_drop=attn_drop_rate, layer_scale=layer_scale)
    x = ImageSizeCheck(dtype=dtype, name="image_size_check")(images)
    x = PatchEmbed(embed_dim, dtype=dtype, name="patch_embed")(x)
    x = layers.Dropout(drop_rate, dtype=dtype, name="pos_drop")(x)
    path_drops = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    stages = []
    for i in range(NUM_STAGES):
        x = GCViTLevel(
            depth=depths[i],
            num_heads=num_heads[i],
            window_size=window_size[i],
            keep_dims=QUERY_KEEP_DIMS[i],
            path_drop=path_drops[sum(depths[:i]) : sum(depths[: i + 1])],
            block_options=block_options,
            dtype=dtype,
            name=f"levels_{i}",
        )(x)
        stages.append(x)
        if i < NUM_STAGES - 1:
            x = ReduceSize(keep_dim=False, dtype=dtype, name=f"levels_{i}_downsample")(x)
    features = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name="norm")(x)
    return stages, features


def imagenet_normalization(name="preprocessing", dtype=None):
    """A layer mapping RGB pixels in [0, 255] to the ImageNet-normalised input of the model.

    `Rescaling` rather than `Normalization(mean=..., variance=...)`: Normalization keeps
    its constants as eager tensors, which a traced function captures as extra inputs,
    and tf2onnx (Keras' ONNX export) writes those as required inputs of the file.
    Rescaling's Python constants are traced into the graph.
    """
    return layers.Rescaling(
        scale=[1.0 / (255.0 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
        dtype=dtype,
        name=name,
    )


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
    include_preprocessing=False,
):
    """Instantiates a Global Context Vision Transformer.

    Reference: Hatamizadeh et al., "Global Context Vision Transformers",
    ICML 2023 (arXiv 2206.09959). The computation is that of the official
    PyTorch code (NVlabs/GCVit).

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
            for variable image sizes (of at least 32 pixels, `ImageSizeCheck`).
            Defaults to (default_size, default_size, 3).
        pooling: with include_top=False, None returns the normalised last
            feature map (B, h, w, C); "avg" or "max" pools it to (B, C).
        classes: number of classes of the head.
        classifier_activation: activation of the head (a name, callable or None).
        default_size: native input size of the configuration.
        include_preprocessing: False (default, as the original port): the model
            expects images already normalised with `tfgcvit.preprocess_input`.
            True: the model takes RGB pixels in [0, 255] (any numeric dtype) and
            normalises them itself (the Keras Applications convention).

    Returns:
        A `keras.Model`.
    """
    depths, num_heads, window_size = check_architecture(embed_dim, depths, num_heads, window_size)
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
    if input_shape is None:
        input_shape = (default_size, default_size, 3)
    input_shape = check_image_shape(input_shape, pretrained=weights is not None)

    image = layers.Input(shape=input_shape, name="image") if input_tensor is None else input_tensor
    x = image
    if include_preprocessing:
        x = imagenet_normalization(dtype="float32")(x)
    _, x = gcvit_graph(
        x,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        layer_scale=layer_scale,
        qkv_bias=qkv_bias,
        qk_scale=qk_scale,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop,
        drop_path_rate=path_drop,
    )

    # Head. It runs in float32 under mixed precision for a stable softmax.
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, kernel_initializer=NumpyGlorotUniform(), name="head",
                         dtype="float32")(x)
        x = layers.Activation(classifier_activation, name="predictions", dtype="float32")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    inputs = image if input_tensor is None else keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, x, name=model_name)

    if weights is not None:
        variant = find_variant(embed_dim, depths, num_heads, window_size, mlp_ratio, layer_scale)
        load_weights(model, weights, variant=variant)
    return model


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
    constructor.variant = variant
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
        **kwargs: other `GCViT` arguments (include_preprocessing, drop_rate,
            attn_drop, path_drop, window_size, qk_scale).

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

CONSTRUCTORS = {constructor.variant: constructor for constructor in (
    GCViTXXTiny, GCViTXTiny, GCViTTiny, GCViTTiny2, GCViTSmall, GCViTSmall2,
    GCViTBase, GCViTLarge, GCViTLarge384, GCViTLarge512)}


def get_constructor(variant):
    """The constructor for a variant name ("tiny", "large_384", or an alias like "nano")."""
    return CONSTRUCTORS[variant_name(variant)]
