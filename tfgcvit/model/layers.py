"""GC ViT building blocks, one layer per concept of the paper.

Every layer works on channels-last tensors and uses `keras.ops` only, so the
model runs on the TensorFlow, JAX and PyTorch backends. Sub-layer and weight
names mirror the official PyTorch code (``levels.0.blocks.1.attn.qkv`` lives
in ``levels_0`` -> ``blocks[1]`` -> ``attn`` -> ``qkv``), which keeps the
checkpoint mapping in `tfgcvit.weights.mapping` a plain table. Sub-layers are given
their parent's dtype policy: Keras does not pass it on, and a backbone built
with `dtype="mixed_bfloat16"` must compute in bfloat16 all the way down.
"""

import numpy as np
import keras
from keras import layers, ops

from tfgcvit.model import tuning
from tfgcvit.config import LAYER_NORM_EPSILON

PACKAGE = "tfgcvit"


# Initializers ------------------------------------------------------------------
# JAX compiles its random number generator anew for every variable shape: building
# GCViT-Tiny spent 12.6 of its 14.1 s there on a 2-core CPU, against 2 s in all
# when the same distributions are drawn with NumPy. Same distributions and seeding as
# Keras' own (a seed drawn from Python's `random` when the initializer is made, so
# `keras.utils.set_random_seed` makes a model reproducible); pretrained weights
# replace the values anyway.


def _fans(shape):
    """(fan_in, fan_out) of a dense (in, out) or convolution (..., in, out) kernel, as Keras counts them."""
    receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _as_variable_dtype(values, dtype):
    # ml_dtypes (a Keras dependency) registers bfloat16 with NumPy.
    return values.astype(keras.backend.standardize_dtype(dtype or keras.config.floatx()))


@keras.saving.register_keras_serializable(package=PACKAGE)
class NumpyGlorotUniform(keras.initializers.GlorotUniform):
    """Keras' `GlorotUniform` (the Dense and Conv default), drawn with NumPy (see above)."""

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


SQRT_HALF = 0.7071067811865476


def _gelu(x):
    """Exact (erf) GELU, as the official model uses (PyTorch's default), not the tanh one.

    On TensorFlow it is written out as 0.5 * x * (1 + erf(x / sqrt(2))):
    `tf.nn.gelu` computes 0.5 * x * erfc(-x / sqrt(2)), and ONNX has no Erfc,
    so Keras' own `model.export(format="onnx")` (tf2onnx) wrote files that ONNX
    Runtime rejects. The two forms differ by float rounding only, and
    TensorFlow's graph optimiser fuses this one into the matmul as well
    (`_FusedMatMul` with BiasAdd + GeluExact). Other backends use their own
    exact GELU (one kernel on PyTorch; the same erf form on JAX).
    """
    if keras.backend.backend() != "tensorflow":
        return ops.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x * SQRT_HALF))


# On TensorFlow, where measured faster, dense layers on more than ROW_SPLIT_MIN_ROWS
# and at most ROW_SPLIT_MAX_ROWS rows of at most ROW_SPLIT_MAX_CHANNELS channels
# run as two half-size matmuls at once (see `_by_row_halves`, `tfgcvit.model.tuning`).
ROW_SPLIT_MIN_ROWS = 64
ROW_SPLIT_MAX_ROWS = 1024
ROW_SPLIT_MAX_CHANNELS = 256


def _by_row_halves(function, rows):
    """`function(rows)` for a row-wise function of a (rows, C) matrix.

    Where `tfgcvit.model.tuning.row_halves()` says so at trace time (TensorFlow,
    two or more threads, measured faster on this machine, tuning not switched
    off; never in exports), matrices
    within the ROW_SPLIT_* limits go through
    `function` as two row halves that are then concatenated: oneDNN's matmul
    inside TensorFlow hardly uses a second thread for a few hundred rows
    (196 x 256 @ 256 x 768: 148 GFLOP/s on one thread, 144 on two, where
    PyTorch reaches 295; `bench/matmul_peak.py`), while two independent
    half-size matmuls run at once on its two inter-op threads. For GCViT-Tiny's
    MLPs that is 1.1-1.45x faster at 98-784 rows of 128-256 channels; with fewer
    rows, more channels (each half then reads all the weights for little work)
    or more rows it gains nothing or loses up to 26% (`bench/row_split.py`,
    measured on a 2-core Intel Xeon; on a 2-core AMD EPYC the same shapes lose
    5-14%, hence the measurement). Rows are independent, so results agree to
    float rounding. Everywhere else (other backends, one thread, not faster
    here, tuning off) this is `function(rows)`. The split ops live under a "row_halves"
    name scope, which is how tests find them in a graph.
    """
    # The shape limits first: `tuning.row_halves()` may time the machine on its first call.
    # (A count known only symbolically, as in JAX's shape-polymorphic export, cannot be compared.)
    static_count = rows.shape[0]
    out_of_range = isinstance(static_count, int) and not ROW_SPLIT_MIN_ROWS < static_count <= ROW_SPLIT_MAX_ROWS
    if rows.shape[-1] > ROW_SPLIT_MAX_CHANNELS or out_of_range or not tuning.row_halves():
        return function(rows)

    def halves():
        half = ops.shape(rows)[0] // 2
        return ops.concatenate([function(rows[:half]), function(rows[half:])], axis=0)

    with keras.name_scope("row_halves"):
        if static_count is not None:
            return halves()
        # The batch size is unknown while tracing: choose when the graph runs.
        count = ops.shape(rows)[0]
        in_range = ops.logical_and(count > ROW_SPLIT_MIN_ROWS, count <= ROW_SPLIT_MAX_ROWS)
        return ops.cond(in_range, halves, lambda: function(rows))


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(layers.LayerNormalization):
    """`LayerNormalization` over the last axis with fewer passes over the tensor.

    Same weights, arithmetic and float32 statistics as Keras' version, written as
    (x - mean) * rsqrt(var + eps) * gamma + beta: on TensorFlow (no fusion
    outside XLA) that is 10 kernels instead of 12 and five full-size passes
    instead of six, about 20% less time per norm and 4% for GCViT-Tiny on CPU.
    On PyTorch Keras' own version is used: it calls the fused `layer_norm`.
    """

    def call(self, inputs):
        rank = len(inputs.shape)
        if keras.backend.backend() == "torch" or [a % rank for a in self.axis] != [rank - 1]:
            return super().call(inputs)
        # Statistics in float32 at least, as Keras does under mixed precision.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        centered = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
        x = centered * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            x = x * ops.cast(self.gamma, dtype)
        if self.center:
            x = x + ops.cast(self.beta, dtype)
        return ops.cast(x, self.compute_dtype)


def _layer_norm(name, dtype=None):
    return LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def _pad_symmetric(x, amount, value=0.0):
    """Pads height and width by `amount` on every side, like PyTorch padding=amount."""
    return ops.pad(
        x,
        [[0, 0], [amount, amount], [amount, amount], [0, 0]],
        constant_values=value,
    )


def relative_position_index(window_size):
    """Index into the bias table for each (query, key) pair of a window.

    Same as the official `relative_position_index` buffer: for tokens i, j with
    (row, col) coordinates, (dr + w - 1) * (2w - 1) + (dc + w - 1).
    """
    coords = np.stack(
        np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")
    ).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return (relative[0] * (2 * window_size - 1) + relative[1]).astype("int32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(layers.Layer):
    """Stochastic depth: drops whole residual branches per sample in training."""

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
        noise = keras.random.uniform(
            shape, dtype=inputs.dtype, seed=self.seed_generator
        )
        mask = ops.floor(keep + noise)
        return inputs / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config


def _call(layer, *args, **kwargs):
    """`layer(*args, **kwargs)` for a built sublayer, called from its parent's `call`.

    On PyTorch, Keras runs the model eagerly and its `Layer.__call__` costs
    about 60 us of Python a call; GC ViT calls about 380 sublayers per image
    (dense layers, norms, attention, MLPs, blocks). Inside a parent's `call`
    that work is already done: the parent's `__call__` converted and cast
    the inputs and opened the autocast scope, our parents build their
    sublayers and pass `training` on. So on PyTorch a built sublayer whose
    input already has its compute dtype, and that is not quantised and has no
    rematerialisation or activity regulariser, is called as
    `layer.call(...)`: the same computation without the wrapper.
    TensorFlow and JAX trace the model once, so there nothing is saved and
    Keras' call (with its name scopes) is kept.
    """
    if (
        keras.backend.backend() == "torch"
        and layer.built
        # Not `layer.dtype_policy.quantization_mode`: in a model built with a DTypePolicyMap
        # (how keras-hub rebuilds a quantised backbone) that is the map's default, None.
        and layer.quantization_mode is None
        and getattr(layer, "_remat_mode", None) is None
        and getattr(layer, "activity_regularizer", None) is None
        and keras.backend.standardize_dtype(args[0].dtype) == layer.compute_dtype
    ):
        return layer.call(*args, **kwargs)
    return layer(*args, **kwargs)


def _regularize(layer, x, training):
    """`layer(x, training=training)` for a `Dropout` or `DropPath`, skipped where that is `x`.

    Both return their input outside training and at rate 0. Skipping the call
    saves Keras' per-layer overhead, which on PyTorch (eager) is about 60 us a
    call: 186 of GCViT-Tiny's 570 layer calls per inference are these. Their
    parents build them in `build`: Keras' JAX `predict` runs the whole model
    eagerly before every batch while any sublayer is unbuilt (4x slower).
    """
    if not training or layer.rate == 0:
        return x
    return layer(x, training=training)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SqueezeExcite(layers.Layer):
    """Squeeze-and-excitation (official `SE`): channel gates from a pooled summary."""

    def __init__(self, expansion=0.25, **kwargs):
        super().__init__(**kwargs)
        self.expansion = expansion

    def build(self, input_shape):
        channels = input_shape[-1]
        self.fc_0 = layers.Dense(int(channels * self.expansion), use_bias=False,
                                 kernel_initializer=NumpyGlorotUniform(), dtype=self.dtype_policy, name="fc_0")
        self.fc_2 = layers.Dense(channels, use_bias=False, kernel_initializer=NumpyGlorotUniform(),
                                 dtype=self.dtype_policy, name="fc_2")
        self.fc_0.build((None, channels))
        self.fc_2.build((None, int(channels * self.expansion)))
        self.built = True

    def call(self, inputs):
        gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
        gate = ops.sigmoid(_call(self.fc_2, _gelu(_call(self.fc_0, gate))))
        return inputs * gate

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"expansion": self.expansion})
        return config


def _channels_first_view(function, x):
    """`function` of a channels-first view of `x` (B, H, W, C), returned channels-last.

    For PyTorch: Keras' channels-last convolution and pooling there copy the
    input to channels-first memory and then back to channels-last memory
    (the format PyTorch's CPU and GPU kernels prefer) before every call. A
    channels-first *view* of a channels-last tensor already is channels-last
    memory, so through the channels-first ops no copy is made, and the
    output, viewed back, is a plain channels-last tensor. Same kernels, same
    arithmetic: results are identical.
    """
    return ops.transpose(function(ops.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))


def _conv(layer, x):
    """`layer(x)` for a channels-last `Conv2D` or `DepthwiseConv2D` of this module.

    On PyTorch through a channels-first view (`_channels_first_view`). Where
    `tuning.shifted_depthwise()` says so (JAX on CPU), a 3x3 depthwise
    convolution (stride 1, "same", no bias: MBConv's) is written as nine
    shifted multiply-adds: XLA's CPU grouped convolution is 13-48x slower than
    that at GC ViT's shapes (`bench/depthwise.py`), and these convolutions
    were most of the JAX backend's CPU time. Same weights, same sums in
    another order: results agree to float rounding. Elsewhere `layer(x)`.
    """
    depthwise = isinstance(layer, layers.DepthwiseConv2D)
    shifted = depthwise and tuning.shifted_depthwise()
    if not shifted and keras.backend.backend() != "torch":
        return layer(x)
    kernel = ops.cast(layer.kernel, x.dtype)
    if shifted:
        return _shifted_depthwise_conv(kernel, x)
    conv = ops.depthwise_conv if depthwise else ops.conv
    x = _channels_first_view(
        lambda v: conv(v, kernel, strides=layer.strides, padding=layer.padding, data_format="channels_first"),
        x,
    )
    if layer.use_bias:
        x = x + ops.cast(layer.bias, x.dtype)
    return x


def _shifted_depthwise_conv(kernel, x):
    """3x3 depthwise convolution, stride 1, padding 1, as nine shifted multiply-adds."""
    height, width = ops.shape(x)[1], ops.shape(x)[2]
    padded = _pad_symmetric(x, 1)
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    return out


def _max_pool_3x3_stride2(x):
    """3x3 max-pool, stride 2, of a map padded by the caller (on PyTorch through a channels-first view)."""
    if keras.backend.backend() != "torch":
        return ops.max_pool(x, pool_size=3, strides=2, padding="valid")
    return _channels_first_view(
        lambda v: ops.max_pool(v, pool_size=3, strides=2, padding="valid", data_format="channels_first"), x
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class MBConv(layers.Layer):
    """Residual fused-MBConv (official `ReduceSize.conv` / `FeatExtract.conv`).

    x + pointwise(SE(GELU(depthwise3x3(x)))); the official Sequential indices
    0, 2 and 3 name the depthwise conv, the SE and the pointwise conv.
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        self.conv_0 = layers.DepthwiseConv2D(
            3, padding="same", use_bias=False, depthwise_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="conv_0"
        )
        self.se = SqueezeExcite(dtype=self.dtype_policy, name="se")
        self.conv_3 = layers.Conv2D(channels, 1, use_bias=False, kernel_initializer=NumpyGlorotUniform(),
                                    dtype=self.dtype_policy, name="conv_3")
        shape = (None, None, None, channels)
        self.conv_0.build(shape)
        self.se.build(shape)
        self.conv_3.build(shape)
        self.built = True

    def call(self, inputs):
        x = _gelu(_conv(self.conv_0, inputs))
        return inputs + _conv(self.conv_3, _call(self.se, x))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReduceSize(layers.Layer):
    """Down-sampling block: LayerNorm, MBConv, strided 3x3 conv, LayerNorm.

    Args:
        keep_dim: keep the channel count (stem) instead of doubling it (stages).
    """

    def __init__(self, keep_dim=False, **kwargs):
        super().__init__(**kwargs)
        self.keep_dim = keep_dim

    def build(self, input_shape):
        channels = input_shape[-1]
        out_channels = channels if self.keep_dim else 2 * channels
        self.norm1 = _layer_norm("norm1", self.dtype_policy)
        self.conv = MBConv(dtype=self.dtype_policy, name="conv")
        self.reduction = layers.Conv2D(
            out_channels, 3, strides=2, use_bias=False, kernel_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="reduction"
        )
        self.norm2 = _layer_norm("norm2", self.dtype_policy)
        shape = (None, None, None, channels)
        self.norm1.build(shape)
        self.conv.build(shape)
        self.reduction.build(shape)
        self.norm2.build((None, None, None, out_channels))
        self.built = True

    def call(self, inputs):
        x = _call(self.conv, _call(self.norm1, inputs))
        # PyTorch pads 1 on every side; Keras "same" would pad bottom/right only.
        x = _conv(self.reduction, _pad_symmetric(x, 1))
        return _call(self.norm2, x)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        half = lambda n: None if n is None else (n - 1) // 2 + 1
        return (batch, half(height), half(width), channels if self.keep_dim else 2 * channels)

    def get_config(self):
        config = super().get_config()
        config.update({"keep_dim": self.keep_dim})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEmbed(layers.Layer):
    """Stem: 3x3 stride-2 conv with bias, then a channel-keeping ReduceSize (stride 4)."""

    def __init__(self, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim

    def build(self, input_shape):
        self.proj = layers.Conv2D(self.embed_dim, 3, strides=2, kernel_initializer=NumpyGlorotUniform(),
                                  dtype=self.dtype_policy, name="proj")
        self.conv_down = ReduceSize(keep_dim=True, dtype=self.dtype_policy, name="conv_down")
        self.proj.build(input_shape)
        self.conv_down.build((None, None, None, self.embed_dim))
        self.built = True

    def call(self, inputs):
        return _call(self.conv_down, _conv(self.proj, _pad_symmetric(inputs, 1)))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        quarter = lambda n: None if n is None else ((n - 1) // 2) // 2 + 1
        return (batch, quarter(height), quarter(width), self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"embed_dim": self.embed_dim})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatExtract(layers.Layer):
    """Global-query feature extractor: MBConv, then (unless keep_dim) a 3x3/2 max-pool."""

    def __init__(self, keep_dim=False, **kwargs):
        super().__init__(**kwargs)
        self.keep_dim = keep_dim

    def build(self, input_shape):
        self.conv = MBConv(dtype=self.dtype_policy, name="conv")
        self.conv.build(input_shape)
        self.built = True

    def call(self, inputs):
        x = _call(self.conv, inputs)
        if self.keep_dim:
            return x
        # PyTorch MaxPool2d(3, 2, padding=1): padded cells never win.
        x = _pad_symmetric(x, 1, value=float("-inf"))
        return _max_pool_3x3_stride2(x)

    def compute_output_shape(self, input_shape):
        if self.keep_dim:
            return input_shape
        batch, height, width, channels = input_shape
        half = lambda n: None if n is None else (n - 1) // 2 + 1
        return (batch, half(height), half(width), channels)

    def get_config(self):
        config = super().get_config()
        config.update({"keep_dim": self.keep_dim})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalQueryGen(layers.Layer):
    """Turns a stage input into the stage's global query tokens, (B, w, w, C).

    A chain of FeatExtract blocks (official `to_q_global`) brings the map to the
    window size at the native resolution; at other resolutions the result is
    resized bilinearly to w x w, as the official detection backbone does.

    Args:
        window_size: the stage's window size w.
        keep_dims: one flag per FeatExtract block, True where it does not pool.
    """

    def __init__(self, window_size, keep_dims, **kwargs):
        super().__init__(**kwargs)
        self.window_size = window_size
        self.keep_dims = tuple(keep_dims)

    def build(self, input_shape):
        self.to_q_global = [
            FeatExtract(keep_dim=keep, dtype=self.dtype_policy, name=f"to_q_global_{i}")
            for i, keep in enumerate(self.keep_dims)
        ]
        for block in self.to_q_global:
            block.build(input_shape)
        self.built = True

    def call(self, inputs):
        x = inputs
        for block in self.to_q_global:
            x = _call(block, x)
        w = self.window_size
        if x.shape[1] != w or x.shape[2] != w:
            x = ops.image.resize(x, (w, w), interpolation="bilinear", antialias=False)
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.window_size, self.window_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"window_size": self.window_size, "keep_dims": list(self.keep_dims)})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class WindowAttention(layers.Layer):
    """Multi-head self-attention inside w x w windows, with relative position bias.

    Local attention projects queries, keys and values from the window tokens
    (`qkv`: C -> 3C). Global attention (`use_global_query=True`) projects only
    keys and values (`qkv`: C -> 2C) and takes its queries from the stage's
    global query, the same for every window of one image.

    Inputs are windows shaped (B, num_windows, w*w, C); the global query is
    (heads, B, 1, w*w, head_dim). Inside, queries, keys and values are laid
    out heads first, (heads, B * num_windows, w*w, head_dim): with 4-D tensors
    and a (heads, 1, N, N) bias, TensorFlow's oneDNN graph rewrite fuses the
    attention matmul, the scale and the bias into one kernel
    (`_MklFusedBatchMatMulV2`), and no tensor has more than 5 dimensions,
    which TFLite requires.
    """

    def __init__(
        self,
        window_size,
        num_heads,
        use_global_query=False,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.window_size = window_size
        self.num_heads = num_heads
        self.use_global_query = use_global_query
        self.qkv_bias = qkv_bias
        self.qk_scale = qk_scale
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.num_heads:
            raise ValueError(
                f"Channels ({channels}) must be divisible by num_heads ({self.num_heads})."
            )
        self.head_dim = channels // self.num_heads
        self.scale = self.qk_scale or self.head_dim**-0.5
        projections = 2 if self.use_global_query else 3
        self.qkv = layers.Dense(
            projections * channels, use_bias=self.qkv_bias, kernel_initializer=NumpyGlorotUniform(),
            dtype=self.dtype_policy, name="qkv"
        )
        self.proj = layers.Dense(channels, kernel_initializer=NumpyGlorotUniform(), dtype=self.dtype_policy,
                                 name="proj")
        self.attn_dropout = layers.Dropout(self.attn_drop, dtype=self.dtype_policy, name="attn_drop")
        self.proj_dropout = layers.Dropout(self.proj_drop, dtype=self.dtype_policy, name="proj_drop")
        self.qkv.build((None, channels))
        # Built here: `_regularize` skips calling them outside training.
        self.attn_dropout.build(None)
        self.proj_dropout.build(None)
        self.proj.build((None, channels))
        self.relative_position_bias_table = self.add_weight(
            name="relative_position_bias_table",
            shape=((2 * self.window_size - 1) ** 2, self.num_heads),
            initializer=NumpyTruncatedNormal(stddev=0.02),
        )
        self.relative_position_index = relative_position_index(self.window_size).reshape(-1)
        self.built = True

    def relative_position_bias(self):
        """The bias added to the attention logits, (heads, 1, w*w, w*w)."""
        tokens = self.window_size**2
        bias = ops.take(self.relative_position_bias_table, self.relative_position_index, axis=0)
        bias = ops.reshape(bias, (1, tokens, tokens, self.num_heads))
        return ops.cast(ops.transpose(bias, (3, 0, 1, 2)), self.compute_dtype)

    def _split_heads(self, x, tokens, parts):
        # (B * nW * N, parts * C) -> parts x (heads, B * nW, N, head_dim)
        x = ops.reshape(x, (-1, tokens, parts, self.num_heads, self.head_dim))
        x = ops.transpose(x, (2, 3, 0, 1, 4))
        # Not `x[i]`: TFLite runs that strided slice element by element outside
        # XNNPACK (17% of GCViT-Tiny's time), an unstack as one copy.
        return ops.unstack(x, parts, axis=0)

    def attend(self, inputs, global_query=None):
        """Attention probabilities and values of windows, before dropout.

        `call` uses this; `tfgcvit.explain` calls it to read the attention.

        Args:
            inputs: windows (B, num_windows, w*w, C).
            global_query: (heads, B, 1, w*w, head_dim) for global attention.

        Returns:
            (probabilities, values): (heads, B * num_windows, w*w queries,
            w*w keys), each query's row summing to one, and
            (heads, B * num_windows, w*w, head_dim).
        """
        windows = ops.shape(inputs)[1]
        tokens = self.window_size**2
        channels = self.num_heads * self.head_dim
        # The projections run on a 2-D (tokens, C) view, see `MLP.call`.
        qkv = _by_row_halves(lambda rows: _call(self.qkv, rows), ops.reshape(inputs, (-1, channels)))
        if self.use_global_query:
            key, value = self._split_heads(qkv, tokens, 2)
            # Every window of an image attends with that image's global query.
            # A tile rather than a broadcast: TFLite's BroadcastTo is a slow
            # reference kernel, and TensorFlow then shares one tile per stage.
            query = ops.tile(global_query, (1, 1, windows, 1, 1))
            query = ops.reshape(query, ops.shape(key))
        else:
            query, key, value = self._split_heads(qkv, tokens, 3)
        attn = ops.matmul(query, ops.swapaxes(key, -1, -2))
        # Scaling the logits rather than the query (as the official code does)
        # is what lets TensorFlow fuse it; the results agree to float rounding.
        attn = attn * ops.cast(self.scale, attn.dtype) + self.relative_position_bias()
        return ops.softmax(attn, axis=-1), value

    def call(self, inputs, global_query=None, training=None):
        batch, windows = ops.shape(inputs)[0], ops.shape(inputs)[1]
        tokens = self.window_size**2
        channels = self.num_heads * self.head_dim
        attn, value = self.attend(inputs, global_query)
        attn = _regularize(self.attn_dropout, attn, training)
        x = ops.matmul(attn, value)  # (heads, B * nW, N, head_dim)
        x = ops.transpose(x, (1, 2, 0, 3))
        x = _by_row_halves(lambda rows: _call(self.proj, rows), ops.reshape(x, (-1, channels)))
        x = ops.reshape(x, (batch, windows, tokens, channels))
        return _regularize(self.proj_dropout, x, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "window_size": self.window_size,
                "num_heads": self.num_heads,
                "use_global_query": self.use_global_query,
                "qkv_bias": self.qkv_bias,
                "qk_scale": self.qk_scale,
                "attn_drop": self.attn_drop,
                "proj_drop": self.proj_drop,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MLP(layers.Layer):
    """Transformer feed-forward: dense C -> hidden, GELU, dense back to C."""

    def __init__(self, hidden_dim, drop=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.drop = drop

    def build(self, input_shape):
        channels = input_shape[-1]
        self.fc1 = layers.Dense(self.hidden_dim, kernel_initializer=NumpyGlorotUniform(), dtype=self.dtype_policy,
                                name="fc1")
        self.fc2 = layers.Dense(channels, kernel_initializer=NumpyGlorotUniform(), dtype=self.dtype_policy,
                                name="fc2")
        self.dropout = layers.Dropout(self.drop, dtype=self.dtype_policy, name="drop")
        self.fc1.build((None, channels))
        self.fc2.build((None, self.hidden_dim))
        self.dropout.build(None)  # see `_regularize`
        self.built = True

    def call(self, inputs, training=None):
        # A 2-D (tokens, C) view: there TensorFlow's graph optimiser fuses matmul,
        # bias and GELU into one oneDNN kernel (`_FusedMatMul`), which Keras'
        # tensordot on a 4-D input prevents (GCViT-Tiny on CPU: 1.15x faster).
        # The reshapes cost nothing on any backend.
        shape = ops.shape(inputs)

        def mlp(x):
            x = _regularize(self.dropout, _gelu(_call(self.fc1, x)), training)
            return _regularize(self.dropout, _call(self.fc2, x), training)

        return ops.reshape(_by_row_halves(mlp, ops.reshape(inputs, (-1, shape[-1]))), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "drop": self.drop})
        return config


def window_partition(x, window_size, size=None):
    """(B, H, W, C) with H, W multiples of w -> (B, H/w * W/w, w*w, C), row-major windows.

    `size`: (B, H, W) when the caller knows them, else read from `x`. A block
    passes its input's batch and its padded height and width, so that in an
    exported graph every block of a stage computes the same window shapes from
    the same values, which ONNX files then compute once (`tfgcvit.export`).
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
    """Swaps axes 2 and 3 of a 6-D window view, where one of them counts the `columns` of windows.

    With one column of windows (a map as wide as the window: GCViT-Tiny's last two
    stages at 224x224) the swap moves a size-1 axis and leaves the memory order
    as it is, but TensorFlow would still copy the tensor (48 of the 159
    transposes it ran per GCViT-Tiny call at 224x224), so then it is left out.
    Where the width is only known when the graph runs, it stays.
    """
    if isinstance(columns, int) and columns == 1:
        return x
    return ops.transpose(x, (0, 1, 3, 2, 4, 5))


# The GCViTBlock arguments a stage passes unchanged to all its blocks.
BLOCK_OPTIONS = ("mlp_ratio", "qkv_bias", "qk_scale", "drop", "attn_drop", "layer_scale")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTBlock(layers.Layer):
    """One transformer block: windowed (local or global) attention, then MLP.

    x = x + DropPath(gamma1 * Attn(LN1(x))); x = x + DropPath(gamma2 * MLP(LN2(x))).
    Maps that are not a multiple of the window are zero-padded bottom/right after
    the first norm and cropped back after attention, as in the official
    detection backbone; at multiples of the window this is a no-op.
    """

    def __init__(
        self,
        window_size,
        num_heads,
        use_global_query=False,
        mlp_ratio=3.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        path_drop=0.0,
        layer_scale=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.window_size = window_size
        self.num_heads = num_heads
        self.use_global_query = use_global_query
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.qk_scale = qk_scale
        self.drop = drop
        self.attn_drop = attn_drop
        self.path_drop = path_drop
        self.layer_scale = layer_scale

    def build(self, input_shape):
        channels = input_shape[-1]
        self.norm1 = _layer_norm("norm1", self.dtype_policy)
        self.attn = WindowAttention(
            self.window_size,
            self.num_heads,
            use_global_query=self.use_global_query,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            attn_drop=self.attn_drop,
            proj_drop=self.drop,
            dtype=self.dtype_policy,
            name="attn",
        )
        self.norm2 = _layer_norm("norm2", self.dtype_policy)
        self.mlp = MLP(int(channels * self.mlp_ratio), drop=self.drop, dtype=self.dtype_policy, name="mlp")
        self.drop_path = DropPath(self.path_drop, dtype=self.dtype_policy, name="drop_path")
        shape = (None, None, None, channels)
        self.norm1.build(shape)
        self.attn.build(shape)
        self.norm2.build(shape)
        self.mlp.build(shape)
        self.drop_path.build(shape)  # see `_regularize`
        if self.layer_scale is not None:
            init = keras.initializers.Constant(self.layer_scale)
            self.gamma1 = self.add_weight(name="gamma1", shape=(channels,), initializer=init)
            self.gamma2 = self.add_weight(name="gamma2", shape=(channels,), initializer=init)
        else:
            self.gamma1 = self.gamma2 = None
        self.built = True

    def _scale(self, x, gamma):
        return x if gamma is None else x * ops.cast(gamma, x.dtype)

    def _attention(self, x, global_query, training):
        w = self.window_size
        batch, height, width = ops.shape(x)[:3]
        pad_h = (w - height % w) % w
        pad_w = (w - width % w) % w
        needs_pad = not (isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == pad_w == 0)
        if needs_pad:
            x = ops.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        windows = window_partition(x, w, (batch, height + pad_h, width + pad_w))
        windows = _call(self.attn, windows, global_query=global_query, training=training)
        x = window_reverse(windows, w, height + pad_h, width + pad_w)
        if needs_pad:
            # A slice, not `x[:, :height, :width]`: TFLite copies it row by row,
            # a strided slice element by element.
            x = ops.slice(x, (0, 0, 0, 0), (batch, height, width, ops.shape(x)[3]))
        return x

    def call(self, inputs, global_query=None, training=None):
        x = self._attention(_call(self.norm1, inputs), global_query, training)
        x = inputs + _regularize(self.drop_path, self._scale(x, self.gamma1), training)
        y = _call(self.mlp, _call(self.norm2, x), training=training)
        return x + _regularize(self.drop_path, self._scale(y, self.gamma2), training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "window_size": self.window_size,
                "num_heads": self.num_heads,
                "use_global_query": self.use_global_query,
                "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.qkv_bias,
                "qk_scale": self.qk_scale,
                "drop": self.drop,
                "attn_drop": self.attn_drop,
                "path_drop": self.path_drop,
                "layer_scale": self.layer_scale,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GCViTLevel(layers.Layer):
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

    def __init__(self, depth, num_heads, window_size, keep_dims, path_drop=0.0, block_options=None, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.num_heads = num_heads
        self.window_size = window_size
        self.keep_dims = tuple(keep_dims)
        if isinstance(path_drop, (list, tuple)):
            if len(path_drop) != depth:
                raise ValueError(f"Expected {depth} path_drop rates, got {len(path_drop)}.")
            self.path_drop = [float(rate) for rate in path_drop]
        else:
            self.path_drop = [float(path_drop)] * depth
        self.block_options = dict(block_options or {})
        unknown = set(self.block_options) - set(BLOCK_OPTIONS)
        if unknown:
            raise ValueError(
                f"Unknown block_options {sorted(unknown)}; GCViTLevel passes {', '.join(BLOCK_OPTIONS)} to its blocks."
            )

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("GCViTLevel needs a known channel dimension.")
        self.head_dim = channels // self.num_heads
        self.q_global_gen = GlobalQueryGen(
            self.window_size, self.keep_dims, dtype=self.dtype_policy, name="q_global_gen"
        )
        self.blocks = [
            GCViTBlock(
                self.window_size,
                self.num_heads,
                use_global_query=bool(i % 2),
                path_drop=self.path_drop[i],
                dtype=self.dtype_policy,
                name=f"blocks_{i}",
                **self.block_options,
            )
            for i in range(self.depth)
        ]
        shape = (None, None, None, channels)
        self.q_global_gen.build(shape)
        for block in self.blocks:
            block.build(shape)
        self.built = True

    def global_query(self, inputs):
        """(B, H, W, C) -> (heads, B, 1, w*w, head_dim): channel c goes to head c // head_dim."""
        q = _call(self.q_global_gen, inputs)
        batch = ops.shape(q)[0]
        q = ops.reshape(q, (batch, 1, self.window_size**2, self.num_heads, self.head_dim))
        return ops.transpose(q, (3, 0, 1, 2, 4))

    def call(self, inputs, training=None):
        global_query = self.global_query(inputs)
        x = inputs
        for block in self.blocks:
            x = _call(block, x, global_query=global_query, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depth": self.depth,
                "num_heads": self.num_heads,
                "window_size": self.window_size,
                "keep_dims": list(self.keep_dims),
                "path_drop": self.path_drop,
                "block_options": dict(self.block_options),
            }
        )
        return config
