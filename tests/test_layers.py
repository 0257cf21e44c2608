"""Every GC ViT layer through the shared harness (tests/layer_harness.py), on every backend."""

import keras
import numpy as np
import pytest

from layer_harness import check_layer

from tfgcvit.model import layers

pytestmark = pytest.mark.backends

GLOBAL_QUERY = np.random.default_rng(5).normal(size=(2, 2, 1, 49, 4)).astype("float32")  # (heads, B, 1, N, d)

# (factory, input shape, constant call arguments); arguments differ from the defaults,
# so that one missing from `get_config` changes the restored layer's output.
CASES = {
    "DropPath": (lambda **kw: layers.DropPath(0.1, seed=3, **kw), (2, 8, 8, 4), None),
    "LayerNorm": (lambda **kw: layers.LayerNorm(epsilon=1e-3, **kw), (2, 4, 5, 8), None),
    "SqueezeExcite": (lambda **kw: layers.SqueezeExcite(0.5, **kw), (2, 8, 8, 8), None),
    "MBConv": (lambda **kw: layers.MBConv(**kw), (2, 8, 8, 8), None),
    "ReduceSize": (lambda **kw: layers.ReduceSize(keep_dim=True, **kw), (2, 9, 11, 8), None),
    "PatchEmbed": (lambda **kw: layers.PatchEmbed(8, **kw), (2, 33, 40, 3), None),
    "FeatExtract": (lambda **kw: layers.FeatExtract(keep_dim=False, **kw), (2, 9, 11, 8), None),
    "GlobalQueryGen": (lambda **kw: layers.GlobalQueryGen(7, (False, True), **kw), (2, 20, 24, 8), None),
    "WindowAttention-local": (
        lambda **kw: layers.WindowAttention(7, 2, qkv_bias=False, qk_scale=0.5, **kw), (2, 3, 49, 8), None),
    "WindowAttention-global": (
        lambda **kw: layers.WindowAttention(7, 2, use_global_query=True, qk_scale=0.5, **kw), (2, 3, 49, 8),
        {"global_query": GLOBAL_QUERY}),
    "MLP": (lambda **kw: layers.MLP(12, drop=0.1, **kw), (2, 5, 6, 8), None),
    "GCViTBlock-local": (
        lambda **kw: layers.GCViTBlock(7, 2, mlp_ratio=2.0, qkv_bias=False, **kw), (2, 7, 14, 8), None),
    "GCViTBlock-global-padded": (
        lambda **kw: layers.GCViTBlock(7, 2, use_global_query=True, mlp_ratio=2.0, layer_scale=1e-5,
                                       path_drop=0.1, qk_scale=0.3, **kw),
        (2, 9, 10, 8), {"global_query": GLOBAL_QUERY}),
    "GCViTLevel": (
        lambda **kw: layers.GCViTLevel(2, 2, 7, (True,), path_drop=[0.0, 0.1],
                                       block_options={"mlp_ratio": 2.0, "layer_scale": 1e-5}, **kw),
        (2, 14, 14, 8), None),
}


# JAX compiles every case's training step (the longest part of the JAX run); its
# composite layers run every other layer inside them, so it checks these only.
ON_JAX = ("PatchEmbed", "ReduceSize", "WindowAttention-global", "GCViTBlock-global-padded", "GCViTLevel")


@pytest.mark.parametrize("case", list(CASES))
def test_layer(case, tmp_path):
    if keras.backend.backend() == "jax" and case not in ON_JAX:
        pytest.skip("on JAX inside the composite layers' cases (see ON_JAX)")
    factory, shape, constants = CASES[case]
    check_layer(factory, shape, constants, tmp_path)


def test_level_passes_its_block_options_to_every_block():
    level = layers.GCViTLevel(2, 2, 7, (True,), path_drop=[0.0, 0.1],
                              block_options={"mlp_ratio": 2.0, "qkv_bias": False, "layer_scale": 1e-5})
    level.build((None, 14, 14, 8))
    for block, rate in zip(level.blocks, [0.0, 0.1]):
        assert (block.mlp_ratio, block.qkv_bias, block.layer_scale, block.path_drop) == (2.0, False, 1e-5, rate)
        assert block.mlp.hidden_dim == 16


def test_level_refuses_unknown_block_options():
    with pytest.raises(ValueError, match=r"Unknown block_options \['mlp'\].*mlp_ratio"):
        layers.GCViTLevel(2, 2, 7, (True,), block_options={"mlp": 2.0})


CONVOLUTIONS = {
    "stem conv (bias, stride 2)": lambda: keras.layers.Conv2D(6, 3, strides=2),
    "strided conv": lambda: keras.layers.Conv2D(8, 3, strides=2, use_bias=False),
    "pointwise conv": lambda: keras.layers.Conv2D(5, 1, use_bias=False),
    "depthwise conv": lambda: keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_conv_equals_the_layers_own_call(name):
    """`layers._conv` (in the form `tfgcvit.model.forms` chooses: a channels-first view on PyTorch,
    shifted taps on JAX's CPU) is the layer's result."""
    conv = CONVOLUTIONS[name]()
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=(2, 11, 9, 4)).astype("float32"))
    conv.build(x.shape)
    conv.set_weights([np.random.default_rng(2).normal(size=w.shape).astype("float32") for w in conv.weights])
    ours = layers._conv(conv, x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(conv(x)),
                               rtol=1e-5, atol=1e-5)
    if keras.backend.backend() == "torch":
        assert ours.is_contiguous()  # a plain channels-last tensor, as the next layer expects


def _numpy_windows(x, w):
    """The official `window_partition`: (B, H, W, C) -> (B * H/w * W/w, w, w, C), row-major windows."""
    b, h, wd, c = x.shape
    return x.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


@pytest.mark.parametrize("height,width", [(14, 14), (21, 7), (7, 21), (14, 21)])
def test_window_partition_and_reverse_match_the_official_layout(height, width):
    """One column of windows (no transpose traced) and several, against the official NumPy order."""
    w = 7
    x = np.random.default_rng(4).normal(size=(2, height, width, 3)).astype("float32")
    windows = layers.window_partition(keras.ops.convert_to_tensor(x), w)
    expected = _numpy_windows(x, w).reshape(2, -1, w * w, 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(windows), expected)
    back = layers.window_reverse(windows, w, height, width)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(back), x)


def test_one_column_of_windows_traces_no_transpose():
    """A map as wide as the window is partitioned and restored without a transpose (TensorFlow's graph)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("counts operations of a TensorFlow graph")
    import tensorflow as tf

    def round_trip(x):
        return layers.window_reverse(layers.window_partition(x, 7), 7, x.shape[1], x.shape[2])

    def transposes(shape):
        graph = tf.function(round_trip).get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
        return sum(op.type == "Transpose" for op in graph.get_operations())

    assert transposes((None, 21, 7, 3)) == 0
    assert transposes((None, 7, 21, 3)) == 2


def test_max_pool_equals_pytorch_max_pool():
    """`layers._max_pool` is PyTorch's MaxPool2d(3, 2, padding=1), in every backend's form."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).normal(size=(2, 13, 10, 4)).astype("float32")
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 2, padding=1)
    ours = layers._max_pool(keras.ops.convert_to_tensor(x))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), expected.permute(0, 2, 3, 1).numpy())
    if keras.backend.backend() == "torch":
        assert ours.is_contiguous()


def test_every_sublayer_of_a_model_is_built():
    """Keras' JAX `predict` runs the whole model eagerly before every batch while a sublayer is unbuilt.

    The Dropout and DropPath layers are never called outside training (`layers._regularize`),
    so their parents must build them.
    """
    from conftest import FIXTURE_CONFIG
    from tfgcvit import GCViT

    model = GCViT(**dict(FIXTURE_CONFIG, depths=(1, 2, 1, 1)), drop_rate=0.1, attn_drop=0.1,
                  input_shape=(64, 64, 3))
    assert [layer.name for layer in model._flatten_layers() if not layer.built] == []


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the layout copies are those of Keras' PyTorch conv")
def test_conv_makes_no_layout_copy_on_torch():
    import torch
    from torch.profiler import profile

    batch = 3  # tells an activation's copy (leading dimension 3) from a kernel's

    def activation_copies(function, x):
        with torch.no_grad(), profile(record_shapes=True) as trace:
            function(x)
        return sum(event.count for event in trace.key_averages(group_by_input_shape=True)
                   if event.key == "aten::copy_" and event.input_shapes[0][:1] == [batch])

    x = torch.randn(batch, 16, 16, 4)
    for conv in (keras.layers.Conv2D(8, 3, strides=2, use_bias=False),
                 keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)):
        conv.build(tuple(x.shape))
        assert activation_copies(conv, x) >= 2  # Keras' own call: to channels-first memory and back
        assert activation_copies(lambda v: layers._conv(conv, v), x) == 0
    keras_pool = activation_copies(lambda v: keras.ops.max_pool(layers._pad(v, 1, float("-inf")), 3, 2), x)
    assert activation_copies(layers._max_pool, x) < keras_pool  # Keras' copy to channels-first memory


@pytest.mark.parametrize("shape", [(96, 288), (3, 3, 64, 128), (3, 3, 256, 1)], ids=["dense", "conv", "depthwise"])
def test_numpy_glorot_uniform_draws_keras_distribution(shape):
    """The NumPy initializers (fast on JAX) fill the same range with the same spread as Keras' own."""
    keras.utils.set_random_seed(0)
    receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    limit = (6.0 / (receptive_field * (shape[-2] + shape[-1]))) ** 0.5
    ours = np.asarray(layers.NumpyGlorotUniform()(shape, dtype="float32"))
    reference = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform(seed=1)(shape, dtype="float32"))
    assert ours.shape == shape and ours.dtype == np.float32
    assert np.abs(ours).max() <= limit and np.abs(reference).max() <= limit
    assert np.abs(ours).max() > 0.98 * limit
    np.testing.assert_allclose(ours.std(), reference.std(), rtol=0.05)
    np.testing.assert_allclose(ours.std(), limit / 3**0.5, rtol=0.05)


def test_numpy_truncated_normal_draws_keras_distribution():
    keras.utils.set_random_seed(0)
    shape = (169 * 4, 8)  # a relative-position bias table: ((2 * 7 - 1) ** 2) x heads, 4 tables
    ours = np.asarray(layers.NumpyTruncatedNormal(stddev=0.02)(shape, dtype="float32"))
    reference = keras.ops.convert_to_numpy(keras.initializers.TruncatedNormal(stddev=0.02, seed=1)(shape))
    assert np.abs(ours).max() <= 0.04 and np.abs(ours).max() > 0.035  # truncated at two standard deviations
    np.testing.assert_allclose(ours.std(), reference.std(), rtol=0.05)
    assert abs(ours.mean()) < 0.002


def test_numpy_initializers_are_seeded_like_keras_and_serialise():
    keras.utils.set_random_seed(7)
    first = [layers.NumpyGlorotUniform(), layers.NumpyTruncatedNormal(stddev=0.02)]
    keras.utils.set_random_seed(7)
    again = [layers.NumpyGlorotUniform(), layers.NumpyTruncatedNormal(stddev=0.02)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a((8, 4), dtype="float32"), b((8, 4), dtype="float32"))
    assert not np.array_equal(first[0]((8, 4)), layers.NumpyGlorotUniform()((8, 4)))  # a new seed each
    assert np.asarray(first[0]((8, 4), dtype="bfloat16")).dtype.name == "bfloat16"
    restored = keras.initializers.deserialize(keras.initializers.serialize(first[1]))
    assert type(restored) is layers.NumpyTruncatedNormal and restored.stddev == 0.02


def test_model_weights_are_reproducible_under_set_random_seed():
    from tfgcvit import GCViT

    config = dict(window_size=(7, 7, 14, 7), embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  mlp_ratio=2, classes=3, input_shape=(64, 64, 3))
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        weights.append([keras.ops.convert_to_numpy(v) for v in GCViT(**config).weights])
    assert len(weights[0]) == len(weights[1]) > 50
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in weights[0] if a.size > 64}) == len([a for a in weights[0] if a.size > 64])
