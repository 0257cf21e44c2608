"""Downstream use: fine-tuning (also under mixed precision), backbone features at any size,
frozen stages, and clear errors for weights or windows that do not fit.

Models are tiny (embed_dim 16) and inputs small so that every backend runs
these in seconds, except for JAX's one-off compilations.
"""

import math

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG, tolerance

BACKEND = keras.backend.backend()

# One global block in stage 1 (blocks alternate local/global), so the global
# query generator is trained; stages with a single block never use theirs,
# which Keras reports as "Gradients do not exist" (filtered below).
TINY = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8))
SIZE = 64
# Mixed-precision logits vs the float32 golden ones on the fixture, as a fraction
# of max(1, max |logits|). Measured (TF / JAX / torch): float16 0.14% / 0.16% / 0.20%,
# bfloat16 1.8% / 1.25% / 1.2% (docs/downstream.md).
MIXED_TOLERANCE = {"mixed_float16": 0.01, "mixed_bfloat16": 0.05}


@pytest.fixture
def dtype_policy():
    """Sets a global dtype policy for one test and restores float32 afterwards."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def finetune_recipe(num_classes, **backbone_kwargs):
    """The original port's recipe: uint8 -> Lambda(preprocess_input) -> backbone -> Dense."""
    from tfgcvit import GCViT, preprocess_input

    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Lambda(preprocess_input)(inputs)
    backbone = GCViT(**TINY, include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3),
                     **backbone_kwargs)
    x = backbone(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs), backbone


# ---------------------------------------------------------------------------
# 1. Fine-tuning under mixed precision on every backend (float32 training and the
# float32 recipe are covered by tests/test_model.py).

# mixed_float16 is the TensorFlow/PyTorch (GPU) policy; mixed_bfloat16 works everywhere.
POLICIES = ["mixed_float16", "mixed_bfloat16"]
SKIP_ON_JAX = "JAX compiles each new shape and dtype for tens of seconds on this CPU"


def skip_float16_on_jax(policy):
    if policy == "mixed_float16" and BACKEND == "jax":
        pytest.skip("mixed_float16 is for TensorFlow and PyTorch; JAX uses mixed_bfloat16")


@pytest.mark.backends
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize("policy", POLICIES)
def test_finetune_recipe_trains(policy, dtype_policy):
    skip_float16_on_jax(policy)
    dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model, backbone = finetune_recipe(3, path_drop=0.1, drop_rate=0.1)
    # TensorFlow spends ~30 s building a training graph for this model; eager runs
    # the same ops and dtypes (a compiled mixed_float16 fit is in docs/downstream.md).
    eager = BACKEND == "tensorflow"
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy",
                  run_eagerly=eager)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    assert backbone.get_layer("levels_1").compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in model.trainable_variables)  # float32 master weights
    assert model.get_layer("head").compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"  # probabilities leave the head in float32

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype="uint8")
    labels = rng.integers(0, 3, 8)
    query_kernel = backbone.get_layer("levels_1").q_global_gen.to_q_global[0].conv.conv_3.kernel
    before = {"query": numpy(query_kernel), "head": numpy(model.get_layer("head").kernel)}
    history = model.fit(images, labels, batch_size=4, epochs=2, verbose=0)

    assert all(math.isfinite(loss) for loss in history.history["loss"])
    assert history.history["loss"][-1] < history.history["loss"][0]  # it learns the batch
    assert not np.allclose(numpy(query_kernel), before["query"])  # gradients reach the global query
    assert not np.allclose(numpy(model.get_layer("head").kernel), before["head"])


@pytest.mark.backends
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_inference_within_documented_tolerance(policy, dtype_policy,
                                                               fixture_state_dict, golden):
    from tfgcvit import GCViT, load_torch_weights

    skip_float16_on_jax(policy)
    if BACKEND == "jax":
        pytest.skip(SKIP_ON_JAX + "; measured on JAX: 1.25% (docs/downstream.md), and "
                    "bfloat16 on JAX is exercised by test_finetune_recipe_trains")
    dtype_policy(policy)
    model = load_torch_weights(GCViT(**FIXTURE_CONFIG), fixture_state_dict)
    assert model.get_layer("levels_2").compute_dtype == policy.split("_")[1]
    assert model.get_layer("head").compute_dtype == "float32"
    logits = numpy(model(golden["inputs"], training=False))
    assert logits.dtype == np.float32
    reference = golden["logits"]
    error = float(np.max(np.abs(logits - reference)))
    assert error <= MIXED_TOLERANCE[policy] * max(1.0, float(np.max(np.abs(reference))))
    assert error > tolerance(reference) / 10  # really ran in reduced precision
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))


# ---------------------------------------------------------------------------
# 3. Backbone features at any input size, and frozen stages.


def expected_stage_sizes(size):
    """Stage map sizes: stem 3x3/2 twice, then a 3x3/2 reduction per stage."""
    sizes = [((size - 1) // 2) // 2 + 1]
    for _ in range(3):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return sizes


@pytest.fixture(scope="module")
def fixture_features(fixture_state_dict):
    """The fixture backbone for any image size, as a feature extractor."""
    from tfgcvit import GCViT, feature_extractor, load_torch_weights

    config = {k: v for k, v in FIXTURE_CONFIG.items() if k not in ("classes", "classifier_activation")}
    backbone = GCViT(**config, include_top=False, input_shape=(None, None, 3))
    load_torch_weights(backbone, fixture_state_dict)
    return feature_extractor(backbone)


@pytest.mark.backends
@pytest.mark.parametrize("height, width", [(97, 131), (256, 320)])
def test_features_at_arbitrary_sizes(fixture_features, height, width):
    if BACKEND == "jax" and height == 256:
        pytest.skip(SKIP_ON_JAX + "; 97x131 runs")
    images = np.random.default_rng(height).normal(size=(1, height, width, 3)).astype("float32")
    features = {k: numpy(v) for k, v in fixture_features(images, training=False).items()}
    for i, (h, w) in enumerate(zip(expected_stage_sizes(height), expected_stage_sizes(width))):
        assert features[f"stage{i}"].shape == (1, h, w, 16 * 2**i)
        assert np.all(np.isfinite(features[f"stage{i}"]))
    # The padding to whole windows is per image: the same image gives the same
    # features alone and inside a batch (up to float summation order).
    if BACKEND == "tensorflow":
        pair = np.concatenate([images, images[:, ::-1]], axis=0)
        batched = numpy(fixture_features(pair, training=False)["stage3"])
        np.testing.assert_allclose(batched[:1], features["stage3"], rtol=0,
                                   atol=tolerance(features["stage3"]))


@pytest.mark.backends
def test_features_at_native_size_match_official(fixture_features, golden):
    if BACKEND != "tensorflow":
        pytest.skip("one more 224 compilation; the other backends check the odd sizes")
    features = fixture_features(golden["inputs"], training=False)
    for i in range(4):
        reference = golden[f"stage{i}"]
        np.testing.assert_allclose(numpy(features[f"stage{i}"]), reference, rtol=0,
                                   atol=tolerance(reference))


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_frozen_stages_do_not_train():
    from tfgcvit import GCViT, feature_extractor

    keras.utils.set_random_seed(1)
    backbone = GCViT(**TINY, include_top=False, input_shape=(None, None, 3))
    frozen = ["patch_embed", "levels_0", "levels_0_downsample"]
    for name in frozen:
        backbone.get_layer(name).trainable = False
    features = feature_extractor(backbone)
    # A head on every stage, so gradients reach all of them.
    pooled = [keras.layers.GlobalAveragePooling2D()(features.output[k])
              for k in ("stage0", "stage1", "stage2", "stage3")]
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()(pooled))
    model = keras.Model(features.inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    frozen_ids = {id(w) for name in frozen for w in backbone.get_layer(name).weights}
    assert frozen_ids and not frozen_ids & {id(w) for w in model.trainable_weights}

    before = {name: [numpy(w) for w in backbone.get_layer(name).weights]
              for name in frozen + ["levels_1", "levels_3"]}
    images = np.random.default_rng(0).normal(size=(2, 80, 96, 3)).astype("float32")
    model.fit(images, np.ones((2, 2), "float32"), epochs=1, verbose=0)
    for name, values in before.items():
        after = [numpy(w) for w in backbone.get_layer(name).weights]
        unchanged = all(np.array_equal(a, b) for a, b in zip(values, after))
        assert unchanged == (name in frozen), name


# ---------------------------------------------------------------------------
# 6. Errors (the other construction and weight errors: tests/test_model.py).


def test_weights_for_other_width_are_rejected_with_shapes(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights
    from tfgcvit.weights.mapping import WeightsMismatchError

    model = GCViT(**dict(FIXTURE_CONFIG, embed_dim=32))
    with pytest.raises(WeightsMismatchError,
                       match=r"shape mismatches: patch_embed\.proj\.weight: checkpoint \(16, 3, 3, 3\)"):
        load_torch_weights(model, fixture_state_dict)


@pytest.mark.backends
def test_windows_larger_than_a_stage_are_padded_not_rejected():
    """At 64x64 stages are 16, 8, 4, 2 wide; windows 7/7/14/7 pad them and still work."""
    if BACKEND == "jax":
        pytest.skip(SKIP_ON_JAX + "; at 97x131 stage 3 (4x5) is also smaller than its window")
    from tfgcvit import GCViT

    model = GCViT(**TINY, input_shape=(SIZE, SIZE, 3), classes=4)
    probabilities = numpy(model(np.zeros((1, SIZE, SIZE, 3), "float32"), training=False))
    assert probabilities.shape == (1, 4) and np.all(np.isfinite(probabilities))
