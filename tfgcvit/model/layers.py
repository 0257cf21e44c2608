"""GC ViT building blocks, one layer per concept of the paper, in the order of timm's gcvit.py.

Every layer works on channels-last tensors with `keras.ops` and public Keras
API only, so the model runs on the TensorFlow, JAX and PyTorch backends.
Sub-layer and weight names mirror the official PyTorch code
(``levels.0.blocks.1.attn.qkv`` lives in ``levels_0`` -> ``blocks[1]`` ->
``attn`` -> ``qkv``), which keeps the checkpoint mapping in
`tfgcvit.weights.mapping` a plain table. Sub-layers get their parent's dtype
policy (Keras does not pass it on: a backbone built with
`dtype="mixed_bfloat16"` must compute in bfloat16 all the way down) and are
built in their parent's `build` (Keras' JAX `predict` runs the whole model
eagerly before every batch while any sub-layer is unbuilt).

Each layer has one form, the official computation; where a runtime is
measurably faster with another, `tfgcvit.model.forms` chooses it from the target.
"""

import numpy as np
import keras
from keras import layers, ops

from tfgcvit.config import LAYER_NORM_EPSILON
from tfgcvit.model import forms

PACKAGE = "tfgcvit"
SQRT_HALF = 0.7071067811865476


# Initial weights ---------------------------------------------------------------
# Keras' own initializers, drawn with NumPy: JAX compiles its random number
# generator anew for every variable shape, and building GCViT-Tiny spent most of
# its time there. Same distributions and seeding as Keras (a seed drawn from
# Python's `random` when the initializer is made, so `keras.utils.set_random_seed`
# makes a model reproducible); pretrained weights replace the values anyway.


def _fans(shape):
    """(fan_in, fan_out) of a dense (in, out) or convolution (..., in, out) kernel, as Keras counts them."""
    receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _as_variable_dtype(values, dtype):
    # ml_dtypes (a Keras dependency) registers bfloat16 with NumPy.
    return values.astype(keras.backend.standardize_dtype(dtype or keras.config.floatx()))


@keras.saving.register_keras_serializable(package=PACKAGE)
class NumpyGlorotUniform(keras.initializers.GlorotUniform):
    """Keras' `GlorotUniform` (the Dense and Conv default), drawn with NumPy."""

    def __call__(self, shape, dtype=None):
        if not isinstance(self.seed, int):  # a SeedGenerator: Keras' own path
            return super().__call__(shape, dtype=dtype)
        fan_in, fan_out = _fans(shape)
        limit = (6.0 / max(1.0, fan_in + fan_out)) ** 0.5
        return _as_variable_dtype(np.random.default_rng(self.seed).uniform(-limit, limit, shape), dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class NumpyTruncatedNormal(keras.initializers.TruncatedNormal):
    """Keras' `TruncatedNormal` (redrawn beyond two standard deviations), drawn with NumPy."""

    def __call__(self, shape, dtype=None):
        if not isinstance(self.seed, int):
            return super().__call__(shape, dtype=dtype)
        rng = np.random.default_rng(self.seed)
        values = rng.standard_normal(shape)
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return _as_variable_dtype(values * self.stddev + self.mean, dtype)


# Sub-layers and functions --------------------------------------------------------


def _built(layer, input_shape):
    layer.build(input_shape)
    return layer


def _dense(parent, units, name, use_bias=True):
    return layers.Dense(units, use_bias=use_bias, kernel_initializer=NumpyGlorotUniform(),
                        dtype=parent.dtype_policy, name=name)


def _dropout(parent, rate, name):
    return layers.Dropout(rate, dtype=parent.dtype_policy, name=name)


def _layer_norm(parent, name):
    return LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=parent.dtype_policy, name=name)


def _gelu(x):
    """Exact (erf) GELU, as the official model uses (PyTorch's default), not the tanh one.

    On TensorFlow written out as 0.5 * x * (1 + erf(x / sqrt(2))): `tf.nn.gelu`
    computes it with erfc, which ONNX lacks, so Keras' own ONNX export (tf2onnx)
    wrote files ONNX Runtime rejects; TensorFlow fuses this form into the matmul
    as well (`_FusedMatMul` with BiasAdd + GeluExact). Other backends use their
    own exact GELU (one kernel on PyTorch; the same erf form on JAX).
    """
    if keras.backend.backend() != "tensorflow":
        return ops.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x * SQRT_HALF))


def _pad(x, amount, value=0.0):
    """Pads height and width by `amount` on every side, like PyTorch's padding=amount."""
    return ops.pad(x, [[0, 0], [amount, amount], [amount, amount], [0, 0]], constant_values=value)


def _regularize(layer, x, training):
    """A `Dropout` or `DropPath` sub-layer: called in training only, where it does something."""
    return layer(x, training=training) if training and layer.rate > 0 else x


def _channels_first_view(function, x):
    """`function` of a channels-first view of `x` (B, H, W, C), returned channels-last.

    For PyTorch, whose CPU and GPU kernels prefer channels-last memory: Keras'
    channels-last convolution and pooling copy the input to channels-first
    memory and back on every call, while a channels-first *view* of a
    channels-last tensor already is channels-last memory. Same kernels, same results.
    """
    return ops.transpose(function(ops.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))


def _conv(layer, x):
    """`layer(x)` for a `Conv2D` or `DepthwiseConv2D`, in the form `forms` chooses for the target."""
    depthwise = isinstance(layer, layers.DepthwiseConv2D)
    if depthwise and forms.shifted_depthwise():
        return _shifted_depthwise_conv(ops.cast(layer.kernel, x.dtype), x)
    if not forms.channels_first_view():
        return layer(x)
    kernel = ops.cast(layer.kernel, x.dtype)
    conv = ops.depthwise_conv if depthwise else ops.conv
    x = _channels_first_view(
        lambda v: conv(v, kernel, layer.strides, layer.padding, data_format="channels_first"), x)
    return x + ops.cast(layer.bias, x.dtype) if layer.use_bias else x


def _shifted_depthwise_conv(kernel, x):
    """3x3 depthwise convolution, stride 1, padding 1, as nine shifted multiply-adds.

    The same sums in another order (results agree to float rounding), for XLA
    on CPU, whose grouped convolution is 13-48x slower at GC ViT's shapes.
    """
    height, width = ops.shape(x)[1], ops.shape(x)[2]
    padded = _pad(x, 1)
    terms = [padded[:, i:i + height, j:j + width, :] * kernel[i, j, :, 0] for i in range(3) for j in range(3)]
    return sum(terms[1:], terms[0])


def _max_pool(x):
    """PyTorch's MaxPool2d(3, 2, padding=1): padded cells never win."""
    x = _pad(x, 1, value=float("-inf"))
    if forms.channels_first_view():
        return _channels_first_view(
            lambda v: ops.max_pool(v, 3, strides=2, padding="valid", data_format="channels_first"), x)
    return ops.max_pool(x, 3, strides=2, padding="valid")


def relative_position_index(window_size):
    """Index into the bias table of each (query, key) pair of a window, as the official buffer.

    For tokens i, j with (row, col) coordinates: (dr + w - 1) * (2w - 1) + (dc + w - 1).
    """
    coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
    coords = coords.reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return (relative[0] * (2 * window_size - 1) + relative[1]).astype("int32")


def window_partition(x, window_size, size=None):
    """(B, H, W, C) with H, W multiples of w -> (B, H/w * W/w, w*w, C), row-major windows.

    `size`: (B, H, W) when the caller knows them, else read from `x`. A block
    passes its input's batch and padded height and width, so that in an
    exported graph every block of a stage computes its window shapes from the
    same values, which ONNX files then compute once (`tfgcvit.export`).
    """
    batch, height, width = size if size is not None else ops.shape(x)[:3]
    channels = x.shape[-1] if x.shape[-1] is not None else ops.shape(x)[-1]
    rows, columns = height // window_size, width // window_size
    x = ops.reshape(x, (batch, rows, window_size, columns, window_size, channels))
    x = _swap_window_axes(x, columns)
    return ops.reshape(x, (batch, rows * columns, window_size * window_size, channels))


def window_reverse(windows, window_size, height, width):
    """Inverse of `window_partition` for a padded map of size height x width."""
    batch, channels = ops.shape(windows)[0], ops.shape(windows)[-1]
    columns = width // window_size
    x = ops.reshape(windows, (batch, height // window_size, columns, window_size, window_size, channels))
    x = _swap_window_axes(x, columns)
    return ops.reshape(x, (batch, height, width, channels))


def _swap_window_axes(x, columns):
    """Swaps axes 2 and 3 of a 6-D window view, one of which counts the `columns` of windows.

    With one column (a map as wide as the window: GCViT-Tiny's last two stages
    at 224x224) the swap moves a size-1 axis, but TensorFlow would still copy
    the tensor (48 of its 159 transposes per call), so then it is left out.
    """
    if isinstance(columns, int) and columns == 1:
        return x
    return ops.transpose(x, (0, 1, 3, 2, 4, 5))


class _Layer(layers.Layer):
    """A GC ViT layer: `get_config` returns the constructor arguments named in `CONFIG`;
    the output has the input's shape unless `compute_output_shape` says otherwise."""

    CONFIG = ()

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.CONFIG})
        return config


def _halved(size):
    return None if size is None else (size - 1) // 2 + 1


# Layers --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(_Layer):
    """Stochastic depth: drops whole residual branches per sample in training."""

    CONFIG = ("rate", "seed")

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, dtype=inputs.dtype, seed=self.seed_generator))
        return inputs / keep * mask


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(layers.LayerNormalization):
    """Keras' `LayerNormalization` over the last axis, in the form `forms.fewer_pass_layer_norm` chooses.

    That form has the same weights, arithmetic and float32 statistics, written as
    (x - mean) * rsqrt(var + eps) * gamma + beta: on TensorFlow (no fusion outside
    XLA) 10 kernels instead of 12 and five full-size passes instead of six.
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        if not forms.fewer_pass_layer_norm() or [a % rank for a in self.axis] != [rank - 1]:
            return super().call(inputs)
        # Statistics in float32 at least, as Keras computes them under mixed precision.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        centered = x - ops.mean(x, axis=-1, keepdims=True)
        x = centered * ops.rsqrt(ops.mean(ops.square(centered), axis=-1, keepdims=True) + self.epsilon)
        if self.scale:
            x = x * ops.cast(self.gamma, dtype)
        if self.center:
            x = x + ops.cast(self.beta, dtype)
        return ops.cast(x, self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SqueezeExcite(_Layer):
    """Squeeze-and-excitation (official `SE`): channel gates from a pooled summary."""

    CONFIG = ("expansion",)

    def __init__(self, expansion=0.25, **kwargs):
        super().__init__(**kwargs)
        self.expansion = expansion

    def build(self, input_shape):
        channels, hidden = input_shape[-1], int(input_shape[-1] * self.expansion)
        self.fc_0 = _built(_dense(self, hidden, "fc_0", use_bias=False), (None, channels))
        self.fc_2 = _built(_dense(self, channels, "fc_2", use_bias=False), (None, hidden))

    def call(self, inputs):
        gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
        return inputs * ops.sigmoid(self.fc_2(_gelu(self.fc_0(gate))))


@keras.saving.register_keras_serializable(package=PACKAGE)
class MBConv(_Layer):
    """Residual fused-MBConv (official `ReduceSize.conv` / `FeatExtract.conv`, timm's `MbConvBlock`).

    x + pointwise(SE(GELU(depthwise3x3(x)))); the official Sequential indices
    0, 2 and 3 name the depthwise conv, the SE and the pointwise conv.
    """

    def build(self, input_shape):
        shape = (None, None, None, input_shape[-1])
        self.conv_0 = _built(layers.DepthwiseConv2D(
            3, padding="same", use_bias=False, depthwise_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="conv_0"), shape)
        self.se = _built(SqueezeExcite(dtype=self.dtype_policy, name="se"), shape)
        self.conv_3 = _built(layers.Conv2D(
            input_shape[-1], 1, use_bias=False, kernel_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="conv_3"), shape)

    def call(self, inputs):
        x = _gelu(_conv(self.conv_0, inputs))
        return inputs + _conv(self.conv_3, self.se(x))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReduceSize(_Layer):
    """Down-sampling block (timm's `Downsample2d`): LayerNorm, MBConv, strided 3x3 conv, LayerNorm.

    Args:
        keep_dim: keep the channel count (stem) instead of doubling it (stages).
    """

    CONFIG = ("keep_dim",)

    def __init__(self, keep_dim=False, **kwargs):
        super().__init__(**kwargs)
        self.keep_dim = keep_dim

    def build(self, input_shape):
        channels = input_shape[-1]
        out_channels = channels if self.keep_dim else 2 * channels
        shape = (None, None, None, channels)
        self.norm1 = _built(_layer_norm(self, "norm1"), shape)
        self.conv = _built(MBConv(dtype=self.dtype_policy, name="conv"), shape)
        self.reduction = _built(layers.Conv2D(
            out_channels, 3, strides=2, use_bias=False, kernel_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="reduction"), shape)
        self.norm2 = _built(_layer_norm(self, "norm2"), (None, None, None, out_channels))

    def call(self, inputs):
        x = self.conv(self.norm1(inputs))
        # PyTorch pads 1 on every side; Keras "same" would pad bottom/right only.
        return self.norm2(_conv(self.reduction, _pad(x, 1)))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, _halved(height), _halved(width), channels if self.keep_dim else 2 * channels)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEmbed(_Layer):
    """Stem: 3x3 stride-2 conv with bias, then a channel-keeping ReduceSize (stride 4)."""

    CONFIG = ("embed_dim",)

    def __init__(self, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim

    def build(self, input_shape):
        self.proj = _built(layers.Conv2D(
            self.embed_dim, 3, strides=2, kernel_initializer=NumpyGlorotUniform(), dtype=self.dtype_policy,
            name="proj"), input_shape)
        self.conv_down = _built(ReduceSize(keep_dim=True, dtype=self.dtype_policy, name="conv_down"),
                                (None, None, None, self.embed_dim))

    def call(self, inputs):
        return self.conv_down(_conv(self.proj, _pad(inputs, 1)))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        return (batch, _halved(_halved(height)), _halved(_halved(width)), self.embed_dim)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatExtract(_Layer):
    """Global-query feature extractor: MBConv, then (unless keep_dim) a 3x3/2 max-pool."""

    CONFIG = ("keep_dim",)

    def __init__(self, keep_dim=False, **kwargs):
        super().__init__(**kwargs)
        self.keep_dim = keep_dim

    def build(self, input_shape):
        self.conv = _built(MBConv(dtype=self.dtype_policy, name="conv"), input_shape)

    def call(self, inputs):
        x = self.conv(inputs)
        return x if self.keep_dim else _max_pool(x)

    def compute_output_shape(self, input_shape):
        if self.keep_dim:
            return input_shape
        batch, height, width, channels = input_shape
        return (batch, _halved(height), _halved(width), channels)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalQueryGen(_Layer):
    """Turns a stage input into the stage's global query tokens, (B, w, w, C).

    A chain of FeatExtract blocks (official `to_q_global`) brings the map to the
    window size at the native resolution; at other resolutions the result is
    resized bilinearly to w x w, as the official detection backbone does.

    Args:
        window_size: the stage's window size w.
        keep_dims: one flag per FeatExtract block, True where it does not pool.
    """

    CONFIG = ("window_size", "keep_dims")

    def __init__(self, window_size, keep_dims, **kwargs):
        super().__init__(**kwargs)
        self.window_size = window_size
        self.keep_dims = [bool(keep) for keep in keep_dims]

    def build(self, input_shape):
        self.to_q_global = [
            _built(FeatExtract(keep_dim=keep, dtype=self.dtype_policy, name=f"to_q_global_{i}"), input_shape)
            for i, keep in enumerate(self.keep_dims)
        ]

    def call(self, inputs):
        x = inputs
        for block in self.to_q_global:
            x = block(x)
        w = self.window_size
        if x.shape[1] != w or x.shape[2] != w:
            x = ops.image.resize(x, (w, w), interpolation="bilinear", antialias=False)
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.window_size, self.window_size, input_shape[-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class WindowAttention(_Layer):
    """Multi-head self-attention inside w x w windows, with relative position bias.

    Local attention projects queries, keys and values from the window tokens
    (`qkv`: C -> 3C); global attention (`use_global_query=True`) projects keys
    and values only (C -> 2C) and takes its queries from the stage's global
    query, the same for every window of one image. Windows come in as
    (B, num_windows, w*w, C), the global query as (heads, B, 1, w*w, head_dim).
    Inside, heads come first, (heads, B * num_windows, w*w, head_dim): then
    TensorFlow's oneDNN rewrite fuses the attention matmul, scale and bias into
    one kernel, and no tensor has more than 5 dimensions (TFLite's limit).
    """

    CONFIG = ("window_size", "num_heads", "use_global_query", "qkv_bias", "qk_scale", "attn_drop",
              "proj_drop")

    def __init__(self, window_size, num_heads, use_global_query=False, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.window_size, self.num_heads, self.use_global_query = window_size, num_heads, use_global_query
        self.qkv_bias, self.qk_scale = qkv_bias, qk_scale
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.num_heads:
            raise ValueError(f"Channels ({channels}) must be divisible by num_heads ({self.num_heads}).")
        self.head_dim = channels // self.num_heads
        self.scale = self.qk_scale or self.head_dim**-0.5
        parts = 2 if self.use_global_query else 3
        self.qkv = _built(_dense(self, parts * channels, "qkv", use_bias=self.qkv_bias), (None, channels))
        self.attn_dropout = _built(_dropout(self, self.attn_drop, "attn_drop"), None)
        self.proj = _built(_dense(self, channels, "proj"), (None, channels))
        self.proj_dropout = _built(_dropout(self, self.proj_drop, "proj_drop"), None)
        self.relative_position_bias_table = self.add_weight(
            name="relative_position_bias_table", shape=((2 * self.window_size - 1) ** 2, self.num_heads),
            initializer=NumpyTruncatedNormal(stddev=0.02))
        self.relative_position_index = relative_position_index(self.window_size).reshape(-1)

    def relative_position_bias(self):
        """The bias added to the attention logits, (heads, 1, w*w, w*w)."""
        tokens = self.window_size**2
        bias = ops.take(self.relative_position_bias_table, self.relative_position_index, axis=0)
        bias = ops.transpose(ops.reshape(bias, (1, tokens, tokens, self.num_heads)), (3, 0, 1, 2))
        return ops.cast(bias, self.compute_dtype)

    def attend(self, inputs, global_query=None):
        """(probabilities, values) of windows (B, num_windows, w*w, C), before dropout.

        Probabilities are (heads, B * num_windows, w*w queries, w*w keys), each
        query's row summing to one; values (heads, B * num_windows, w*w, head_dim).
        `tfgcvit.explain` calls this to read the attention.
        """
        windows, tokens = ops.shape(inputs)[1], self.window_size**2
        parts = 2 if self.use_global_query else 3
        # A 2-D (tokens, C) view: see `MLP.call`.
        qkv = self.qkv(ops.reshape(inputs, (-1, self.num_heads * self.head_dim)))
        qkv = ops.reshape(qkv, (-1, tokens, parts, self.num_heads, self.head_dim))
        qkv = ops.transpose(qkv, (2, 3, 0, 1, 4))  # (parts, heads, B * nW, N, head_dim)
        # An unstack (timm's unbind), not `qkv[i]`: TFLite runs that strided slice element by element.
        if self.use_global_query:
            key, value = ops.unstack(qkv, 2, axis=0)
            # Each image's global query for all its windows; a tile rather than a broadcast,
            # which TFLite runs as a slow reference kernel.
            query = ops.reshape(ops.tile(global_query, (1, 1, windows, 1, 1)), ops.shape(key))
        else:
            query, key, value = ops.unstack(qkv, 3, axis=0)
        # The logits scaled rather than the query (the official order): TensorFlow fuses this.
        attn = ops.matmul(query, ops.swapaxes(key, -1, -2)) * ops.cast(self.scale, query.dtype)
        return ops.softmax(attn + self.relative_position_bias(), axis=-1), value

    def call(self, inputs, global_query=None, training=None):
        shape = ops.shape(inputs)
        attn, value = self.attend(inputs, global_query)
        x = ops.matmul(_regularize(self.attn_dropout, attn, training), value)  # (heads, B * nW, N, head_dim)
        x = ops.reshape(ops.transpose(x, (1, 2, 0, 3)), (-1, self.num_heads * self.head_dim))
        return _regularize(self.proj_dropout, ops.reshape(self.proj(x), shape), training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MLP(_Layer):
    """Transformer feed-forward: dense C -> hidden, GELU, dense back to C."""

    CONFIG = ("hidden_dim", "drop")

    def __init__(self, hidden_dim, drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.drop = drop

    def build(self, input_shape):
        channels = input_shape[-1]
        self.fc1 = _built(_dense(self, self.hidden_dim, "fc1"), (None, channels))
        self.fc2 = _built(_dense(self, channels, "fc2"), (None, self.hidden_dim))
        self.dropout = _built(_dropout(self, self.drop, "drop"), None)

    def call(self, inputs, training=None):
        # A 2-D (tokens, C) view: there TensorFlow fuses matmul, bias and GELU into one
        # oneDNN kernel (`_FusedMatMul`), which Keras' tensordot of a 4-D input prevents.
        shape = ops.shape(inputs)
        x = _regularize(self.dropout, _gelu(self.fc1(ops.reshape(inputs, (-1, shape[-1])))), training)
        return ops.reshape(_regularize(self.dropout, self.fc2(x), training), shape)


# The GCViTBlock arguments a stage passes unchanged to all its blocks.
BLOCK_OPTIONS = ("mlp_ratio", "qkv_bias", "qk_scale", "drop", "attn_drop", "layer_scale")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTBlock(_Layer):
    """One transformer block: windowed (local or global) attention, then MLP.

    x = x + DropPath(gamma1 * Attn(LN1(x))); x = x + DropPath(gamma2 * MLP(LN2(x))).
    Maps that are not a multiple of the window are zero-padded bottom/right after
    the first norm and cropped back after attention, as in the official
    detection backbone; at multiples of the window this is a no-op.
    """

    CONFIG = ("window_size", "num_heads", "use_global_query", "path_drop") + BLOCK_OPTIONS

    def __init__(self, window_size, num_heads, use_global_query=False, mlp_ratio=3.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, path_drop=0.0, layer_scale=None, **kwargs):
        super().__init__(**kwargs)
        self.window_size, self.num_heads, self.use_global_query = window_size, num_heads, use_global_query
        self.mlp_ratio, self.qkv_bias, self.qk_scale = mlp_ratio, qkv_bias, qk_scale
        self.drop, self.attn_drop, self.path_drop, self.layer_scale = drop, attn_drop, path_drop, layer_scale

    def build(self, input_shape):
        channels = input_shape[-1]
        shape = (None, None, None, channels)
        self.norm1 = _built(_layer_norm(self, "norm1"), shape)
        self.attn = _built(WindowAttention(
            self.window_size, self.num_heads, use_global_query=self.use_global_query, qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale, attn_drop=self.attn_drop, proj_drop=self.drop, dtype=self.dtype_policy,
            name="attn"), shape)
        self.norm2 = _built(_layer_norm(self, "norm2"), shape)
        hidden = int(channels * self.mlp_ratio)
        self.mlp = _built(MLP(hidden, drop=self.drop, dtype=self.dtype_policy, name="mlp"), shape)
        self.drop_path = _built(DropPath(self.path_drop, dtype=self.dtype_policy, name="drop_path"), shape)
        self.gamma1 = self.gamma2 = None
        if self.layer_scale is not None:
            init = keras.initializers.Constant(self.layer_scale)
            self.gamma1 = self.add_weight(name="gamma1", shape=(channels,), initializer=init)
            self.gamma2 = self.add_weight(name="gamma2", shape=(channels,), initializer=init)

    def _residual(self, x, gamma, training):
        x = x if gamma is None else x * ops.cast(gamma, x.dtype)
        return _regularize(self.drop_path, x, training)

    def _window_attention(self, x, global_query, training):
        w = self.window_size
        batch, height, width = ops.shape(x)[:3]
        pad_h, pad_w = (w - height % w) % w, (w - width % w) % w
        padded = not (isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == pad_w == 0)
        if padded:
            x = ops.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        windows = window_partition(x, w, (batch, height + pad_h, width + pad_w))
        windows = self.attn(windows, global_query=global_query, training=training)
        x = window_reverse(windows, w, height + pad_h, width + pad_w)
        # A slice, not `x[:, :height, :width]`: TFLite copies a slice row by row, a strided
        # slice element by element.
        return ops.slice(x, (0, 0, 0, 0), (batch, height, width, ops.shape(x)[3])) if padded else x

    def call(self, inputs, global_query=None, training=None):
        x = inputs + self._residual(self._window_attention(self.norm1(inputs), global_query, training),
                                    self.gamma1, training)
        return x + self._residual(self.mlp(self.norm2(x), training=training), self.gamma2, training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTLevel(_Layer):
    """One stage (official `GCViTLayer`) without its downsample.

    Builds the global query once from the stage input, then runs `depth` blocks
    alternating local (even) and global (odd) attention. The downsample is a
    separate `ReduceSize` layer so that the stage output is a feature map.

    Args:
        depth: number of blocks.
        num_heads: attention heads.
        window_size: window size w.
        keep_dims: FeatExtract pooling flags of the global query generator.
        path_drop: a rate, or one stochastic-depth rate per block.
        block_options: the other `GCViTBlock` arguments, the same for every
            block (`mlp_ratio`, `qkv_bias`, `qk_scale`, `drop`, `attn_drop`,
            `layer_scale`); unset ones take `GCViTBlock`'s defaults.
    """

    CONFIG = ("depth", "num_heads", "window_size", "keep_dims", "path_drop", "block_options")

    def __init__(self, depth, num_heads, window_size, keep_dims, path_drop=0.0, block_options=None, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.num_heads, self.window_size = depth, num_heads, window_size
        self.keep_dims = [bool(keep) for keep in keep_dims]
        if isinstance(path_drop, (list, tuple)) and len(path_drop) != depth:
            raise ValueError(f"Expected {depth} path_drop rates, got {len(path_drop)}.")
        rates = path_drop if isinstance(path_drop, (list, tuple)) else [path_drop] * depth
        self.path_drop = [float(rate) for rate in rates]
        self.block_options = dict(block_options or {})
        unknown = set(self.block_options) - set(BLOCK_OPTIONS)
        if unknown:
            raise ValueError(f"Unknown block_options {sorted(unknown)}; GCViTLevel passes "
                             f"{', '.join(BLOCK_OPTIONS)} to its blocks.")

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("GCViTLevel needs a known channel dimension.")
        self.head_dim = channels // self.num_heads
        shape = (None, None, None, channels)
        self.q_global_gen = _built(GlobalQueryGen(self.window_size, self.keep_dims, dtype=self.dtype_policy,
                                                  name="q_global_gen"), shape)
        self.blocks = [
            _built(GCViTBlock(self.window_size, self.num_heads, use_global_query=bool(i % 2),
                              path_drop=self.path_drop[i], dtype=self.dtype_policy, name=f"blocks_{i}",
                              **self.block_options), shape)
            for i in range(self.depth)
        ]

    def global_query(self, inputs):
        """(B, H, W, C) -> (heads, B, 1, w*w, head_dim): channel c goes to head c // head_dim."""
        q = self.q_global_gen(inputs)
        q = ops.reshape(q, (ops.shape(q)[0], 1, self.window_size**2, self.num_heads, self.head_dim))
        return ops.transpose(q, (3, 0, 1, 2, 4))

    def call(self, inputs, training=None):
        global_query = self.global_query(inputs)
        x = inputs
        for block in self.blocks:
            x = block(x, global_query=global_query, training=training)
        return x
