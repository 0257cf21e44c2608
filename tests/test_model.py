"""Model behaviour: API, shapes, batch independence, variable shapes, serialisation, training, errors."""

import json

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG, OFFICIAL_PARAMS, REFERENCE, tolerance

import tfgcvit
from tfgcvit import GCViT, feature_extractor
from tfgcvit.model.gcvit import CONSTRUCTORS, VARIANTS

# A tiny configuration for fast structural tests.
SMALL = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8),
             mlp_ratio=2, layer_scale=1e-5, classes=5)

SHAPES_KEY = {"large_384": "large_384_21k", "large_512": "large_512_21k"}


def test_public_api_matches_original_port():
    for name in ("GCViTNano", "GCViTMicro", "GCViTTiny", "GCViTSmall", "GCViTBase", "preprocess_input",
                 "decode_predictions", "load_torch_weights", "feature_extractor", "GCViTXXTiny",
                 "GCViTXTiny", "GCViTTiny2", "GCViTSmall2", "GCViTLarge", "GCViTLarge384", "GCViTLarge512"):
        assert hasattr(tfgcvit, name), name
    assert tfgcvit.GCViTNano.__doc__ and "xxtiny" in tfgcvit.GCViTNano.__doc__


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_and_every_shape_match_official(variant):
    from tfgcvit.weights.mapping import keras_weight_table

    model = CONSTRUCTORS[variant](weights=None)
    assert model.count_params() == OFFICIAL_PARAMS[variant]
    size = VARIANTS[variant]["input_size"]
    assert model.input_shape == (None, size, size, 3)
    with open(REFERENCE / "official_state_dict_shapes.json") as file:
        official = json.load(file)[SHAPES_KEY.get(variant, variant)]
    official = {k: tuple(v) for k, v in official.items() if not k.endswith("relative_position_index")}
    ours = {name: variable for name, variable, _ in keras_weight_table(model)}
    assert set(ours) == set(official)
    for name, shape in official.items():
        assert int(np.prod(ours[name].shape)) == int(np.prod(shape)), name


def test_find_variant_prefers_exact_windows_then_ignores_them():
    from tfgcvit.model.gcvit import find_variant

    tiny = VARIANTS["tiny"]
    args = (tiny["embed_dim"], tiny["depths"], tiny["num_heads"])
    assert find_variant(*args, (7, 7, 14, 7), 3.0, None) == "tiny"
    assert find_variant(*args, (12, 12, 24, 12), 3.0, None) == "tiny"  # weights load with resized tables
    large = VARIANTS["large"]
    args = (large["embed_dim"], large["depths"], large["num_heads"])
    assert find_variant(*args, (12, 12, 24, 12), 2.0, 1e-5) == "large_384"
    assert find_variant(*args, (9, 9, 18, 9), 2.0, 1e-5) == "large"
    assert find_variant(16, (2, 2, 3, 2), (1, 2, 4, 8), (7, 7, 14, 7), 3.0, 1e-5) is None


def test_original_port_names_are_the_official_small_variants():
    # The original port's Nano and Micro are NVIDIA's XXTiny and XTiny.
    assert tfgcvit.GCViTNano(weights=None).count_params() == OFFICIAL_PARAMS["xxtiny"]
    assert tfgcvit.GCViTMicro(weights=None).count_params() == OFFICIAL_PARAMS["xtiny"]
    from tfgcvit.config import variant_name

    assert (variant_name("Nano"), variant_name("micro"), variant_name("Large-384")) == ("xxtiny", "xtiny", "large_384")


@pytest.fixture(scope="module")
def small_model():
    return GCViT(**SMALL, input_shape=(None, None, 3))


def test_batch_independence(fixture_model, golden):
    """Each image keeps its own global query (the bug of NVlabs/GCVit issue 10)."""
    images = golden["inputs"]
    alone = fixture_model.predict(images[1:2], verbose=0)
    batch = fixture_model.predict(np.concatenate([images[1:2], images[0:1], images[1:2] * 0.5]), verbose=0)
    np.testing.assert_allclose(batch[0], alone[0], rtol=0, atol=1e-5)
    swapped = fixture_model.predict(images[::-1], verbose=0)
    np.testing.assert_allclose(swapped[::-1], golden["logits"], rtol=0, atol=tolerance(golden["logits"]))


def test_variable_shape_model_equals_fixed_model_at_native_size(fixture_model, fixture_state_dict, golden):
    from tfgcvit import load_torch_weights

    dynamic = GCViT(**FIXTURE_CONFIG, input_shape=(None, None, 3))
    load_torch_weights(dynamic, fixture_state_dict)
    np.testing.assert_allclose(
        dynamic.predict(golden["inputs"], verbose=0), golden["logits"], rtol=0, atol=tolerance(golden["logits"])
    )
    features = feature_extractor(dynamic).predict(golden["inputs"], verbose=0)
    for name in ("stage0", "stage1", "stage2", "stage3"):
        np.testing.assert_allclose(features[name], golden[name], rtol=0, atol=tolerance(golden[name]))


@pytest.mark.parametrize("height,width", [(256, 320), (97, 131), (32, 32), (33, 61)])
def test_variable_shapes_run(small_model, height, width):
    images = np.random.default_rng(0).normal(size=(2, height, width, 3)).astype("float32")
    logits = small_model.predict(images, verbose=0)
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    features = feature_extractor(small_model).predict(images, verbose=0)
    size = lambda n, k: n if k == 0 else (size(n, k - 1) - 1) // 2 + 1
    for i in range(4):
        expected = (2, size(height, i + 2), size(width, i + 2), 16 * 2**i)
        assert features[f"stage{i}"].shape == expected
        assert np.all(np.isfinite(features[f"stage{i}"]))


def test_dynamic_batch(small_model):
    for batch in (1, 3):
        images = np.zeros((batch, 64, 96, 3), "float32")
        assert small_model.predict(images, verbose=0).shape == (batch, 5)


@pytest.mark.backends
@pytest.mark.parametrize("rows", [1, 197])
def test_mlp_matches_numpy(rows):
    """The MLP (dense, exact GELU, dense) on a token count known only when it runs."""
    import math

    channels, hidden = 8, 24
    inputs = keras.Input((None, 1, channels))
    mlp = tfgcvit.model.layers.MLP(hidden)
    model = keras.Model(inputs, mlp(inputs))
    rng = np.random.default_rng(rows)
    weights = [0.3 * rng.normal(size=v.shape).astype("float32") for v in mlp.weights]
    mlp.set_weights(weights)
    x = rng.normal(size=(1, rows, 1, channels)).astype("float32")
    w1, b1, w2, b2 = weights
    h = x.reshape(rows, channels) @ w1 + b1
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    expected = (h @ w2 + b2).reshape(x.shape)
    for got in (model.predict(x, verbose=0), keras.ops.convert_to_numpy(mlp(x))):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_padding_leaves_padded_image_region_out(small_model):
    """An image not a window multiple: outputs are finite and independent of the batch."""
    images = np.random.default_rng(2).normal(size=(2, 97, 131, 3)).astype("float32")
    both = small_model.predict(images, verbose=0)
    alone = small_model.predict(images[1:], verbose=0)
    np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling,shape", [(None, (1, 2, 3, 128)), ("avg", (1, 128)), ("max", (1, 128))])
def test_include_top_false(pooling, shape):
    model = GCViT(**dict(SMALL, layer_scale=None), include_top=False, pooling=pooling, input_shape=(64, 96, 3))
    assert model.predict(np.zeros((1, 64, 96, 3), "float32"), verbose=0).shape == shape
    assert all(layer.name != "head" for layer in model.layers)


def test_original_port_custom_classification_recipe():
    inputs = keras.layers.Input(shape=(64, 64, 3), dtype="uint8")
    outputs = keras.layers.Lambda(tfgcvit.preprocess_input)(inputs)
    # Two blocks per stage, so that every stage has a global block using its query generator.
    backbone = GCViT(**dict(SMALL, depths=(2, 2, 2, 2)), include_top=False, pooling="avg", input_shape=(64, 64, 3))
    outputs = backbone(outputs)
    outputs = keras.layers.Dense(3, activation="softmax")(outputs)
    model = keras.Model(inputs, outputs)
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3), dtype="uint8")
    model.compile("sgd", "sparse_categorical_crossentropy")
    history = model.fit(pixels, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(pixels, verbose=0).shape == (4, 3)


def test_input_tensor():
    image = keras.Input((64, 64, 3))
    model = GCViT(**SMALL, input_tensor=image)
    assert model.inputs[0] is image
    assert model.output_shape == (None, 5)


@pytest.mark.backends
def test_include_preprocessing_takes_raw_pixels(tmp_path):
    from tfgcvit import preprocess_input

    plain = GCViT(**SMALL, input_shape=(None, None, 3))
    raw = GCViT(**SMALL, input_shape=(None, None, 3), include_preprocessing=True)
    raw.set_weights(plain.get_weights())  # the normalisation has no trainable weights
    pixels = np.random.default_rng(4).integers(0, 256, size=(2, 64, 72, 3)).astype("uint8")
    expected = plain.predict(preprocess_input(pixels), verbose=0)
    np.testing.assert_allclose(raw.predict(pixels, verbose=0), expected, rtol=0, atol=1e-5)
    assert not np.allclose(plain.predict(pixels.astype("float32"), verbose=0), expected, atol=1e-3)
    path = tmp_path / "raw.keras"
    raw.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(pixels, verbose=0), expected, rtol=0, atol=1e-5)


def test_classifier_activation_softmax():
    model = GCViT(**SMALL, input_shape=(64, 64, 3), classifier_activation="softmax")
    probabilities = model.predict(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


class TestSerialisation:
    def test_get_config_round_trip(self, small_model):
        clone = keras.Model.from_config(small_model.get_config())
        clone.set_weights(small_model.get_weights())
        images = np.random.default_rng(3).normal(size=(2, 64, 80, 3)).astype("float32")
        np.testing.assert_array_equal(clone.predict(images, verbose=0), small_model.predict(images, verbose=0))

    def test_keras_file_round_trip(self, fixture_model, golden, tmp_path):
        path = tmp_path / "gcvit.keras"
        fixture_model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(
            loaded.predict(golden["inputs"], verbose=0), fixture_model.predict(golden["inputs"], verbose=0)
        )

    def test_weights_file_round_trip(self, fixture_model, golden, tmp_path):
        path = tmp_path / "gcvit.weights.h5"
        fixture_model.save_weights(path)
        model = GCViT(**FIXTURE_CONFIG, weights=str(path))
        np.testing.assert_array_equal(
            model.predict(golden["inputs"], verbose=0), fixture_model.predict(golden["inputs"], verbose=0)
        )


@pytest.mark.backends
class TestTraining:
    def test_fit_reduces_loss_and_every_weight_gets_a_gradient(self):
        keras.utils.set_random_seed(0)
        model = GCViT(**dict(SMALL, depths=(2, 2, 2, 2)), input_shape=(64, 64, 3), path_drop=0.0,
                      classifier_activation=None)
        before = [np.array(v) for v in model.trainable_variables]
        images = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype("float32")
        labels = np.arange(8) % 5
        # Adam's first steps move every weight with a non-zero gradient by about the
        # learning rate, however small the gradient (layer scale makes some tiny).
        model.compile(keras.optimizers.Adam(1e-3, epsilon=1e-20),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(images, labels, epochs=4, batch_size=8, verbose=0)
        losses = history.history["loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
        unchanged = [v.path for v, old in zip(model.trainable_variables, before)
                     if np.array_equal(np.array(v), old)]
        assert unchanged == []

    def test_stochastic_depth_and_dropout_live_only_in_training(self):
        model = GCViT(**SMALL, input_shape=(64, 64, 3), path_drop=0.5, drop_rate=0.2, attn_drop=0.2)
        images = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype("float32")
        inference = [keras.ops.convert_to_numpy(model(images, training=False)) for _ in range(2)]
        np.testing.assert_array_equal(inference[0], inference[1])
        training = [keras.ops.convert_to_numpy(model(images, training=True)) for _ in range(2)]
        assert not np.allclose(training[0], training[1])
        assert not np.allclose(training[0], inference[0])

    def test_layer_scale_is_trainable(self):
        model = GCViT(**SMALL, input_shape=(64, 64, 3))
        gammas = [v for v in model.trainable_variables if v.path.endswith(("gamma1", "gamma2"))]
        assert len(gammas) == 2 * sum(SMALL["depths"])
        np.testing.assert_allclose(np.array(gammas[0]), 1e-5)


class TestBadInput:
    def test_pretrained_weights_need_three_channels(self):
        with pytest.raises(ValueError, match="3 channels"):
            tfgcvit.GCViTTiny(input_shape=(224, 224, 1))

    @pytest.mark.parametrize("shape", [(31, 224, 3), (224, 16, 3)])
    def test_spatial_size_below_minimum(self, shape):
        with pytest.raises(ValueError, match="minimum of 32"):
            tfgcvit.GCViTTiny(weights=None, input_shape=shape)

    def test_input_shape_needs_three_dimensions(self):
        with pytest.raises(ValueError, match="height, width, channels"):
            tfgcvit.GCViTTiny(weights=None, input_shape=(224, 224))

    def test_classes_with_imagenet_head(self):
        with pytest.raises(ValueError, match="must be 1000"):
            tfgcvit.GCViTTiny(weights="imagenet", classes=10)

    def test_activation_with_imagenet_head(self):
        with pytest.raises(ValueError, match="classifier_activation"):
            tfgcvit.GCViTTiny(weights="imagenet", classifier_activation="sigmoid")

    def test_unknown_pooling(self):
        with pytest.raises(ValueError, match="pooling"):
            tfgcvit.GCViTTiny(weights=None, include_top=False, pooling="mean")

    def test_input_tensor_must_be_keras_tensor(self):
        with pytest.raises(ValueError, match="Keras tensor"):
            tfgcvit.GCViTTiny(weights=None, input_tensor=np.zeros((1, 224, 224, 3), "float32"))

    def test_input_tensor_and_shape_disagree(self):
        with pytest.raises(ValueError, match="differs"):
            tfgcvit.GCViTTiny(weights=None, input_tensor=keras.Input((64, 64, 3)), input_shape=(96, 96, 3))

    def test_missing_weights_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            tfgcvit.GCViTXXTiny(weights=str(tmp_path / "nope.pth"))

    @pytest.mark.parametrize("window_size", [(7, 7, 14), 7, (7, 7, 14.5, 7), ("7", 7, 14, 7), (7, 0, 14, 7),
                                             (7, 7, 14, -7)])
    def test_bad_window_size(self, window_size):
        with pytest.raises(ValueError, match="`window_size` must be 4 positive integers"):
            GCViT(**dict(SMALL, window_size=window_size))

    def test_heads_must_divide_channels(self):
        with pytest.raises(ValueError, match="divisible"):
            GCViT(**dict(SMALL, num_heads=(3, 2, 4, 8)))

    def test_weights_of_wrong_type(self):
        with pytest.raises(ValueError, match="weights"):
            tfgcvit.GCViTTiny(weights=123)

    def test_wrong_checkpoint_lists_the_offending_names(self, fixture_state_dict):
        model = GCViT(**dict(FIXTURE_CONFIG, depths=(2, 2, 2, 2)))
        with pytest.raises(tfgcvit.weights.mapping.WeightsMismatchError) as error:
            tfgcvit.load_torch_weights(model, fixture_state_dict)
        message = str(error.value)
        assert "not in the model: levels.2.blocks.2." in message
        assert "same variant (embed_dim, depths, heads, window sizes)" in message

    def test_wrong_head_size_names_the_shape(self, fixture_state_dict):
        model = GCViT(**dict(FIXTURE_CONFIG, classes=7))
        with pytest.raises(tfgcvit.weights.mapping.WeightsMismatchError, match=r"head.weight: checkpoint \(10, 128\)"):
            tfgcvit.load_torch_weights(model, fixture_state_dict)

    def test_missing_tensor_is_named(self, fixture_state_dict):
        model = GCViT(**FIXTURE_CONFIG)
        incomplete = {k: v for k, v in fixture_state_dict.items() if k != "levels.1.blocks.0.attn.qkv.bias"}
        with pytest.raises(tfgcvit.weights.mapping.WeightsMismatchError, match="missing.*levels.1.blocks.0.attn.qkv.bias"):
            tfgcvit.load_torch_weights(model, incomplete)


class TestPreprocessing:
    def test_uint8_float_and_tensor_inputs_agree(self):
        pixels = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype="uint8")
        expected = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        for value in (pixels, pixels.astype("float64"), pixels.astype("int32")):
            result = tfgcvit.preprocess_input(value)
            assert result.dtype == np.float32
            np.testing.assert_allclose(result, expected, atol=1e-5)
        tensor = keras.ops.convert_to_tensor(pixels)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(tfgcvit.preprocess_input(tensor)), expected,
                                   atol=1e-5)

    def test_wrong_channels(self):
        with pytest.raises(ValueError, match="3 channels"):
            tfgcvit.preprocess_input(np.zeros((2, 8, 8, 4)))

    def test_decode_predictions_offline(self):
        predictions = np.zeros((2, 1000), "float32")
        predictions[0, 281] = 0.9  # tabby cat
        predictions[1, 1] = 0.8
        decoded = tfgcvit.decode_predictions(predictions, top=3)
        assert decoded[0][0] == ("n02123045", "tabby", pytest.approx(0.9))
        assert decoded[1][0][:2] == ("n01443537", "goldfish")
        assert len(decoded[0]) == 3

    def test_decode_predictions_rejects_other_shapes(self):
        with pytest.raises(ValueError, match="1000"):
            tfgcvit.decode_predictions(np.zeros((2, 10)))
