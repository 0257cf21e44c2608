"""Parity with the official PyTorch code on the shared golden checkpoint, on every backend."""

import numpy as np
import pytest

from conftest import FIXTURE_CONFIG, tolerance

pytestmark = pytest.mark.backends


def test_logits_match_official(fixture_model, golden):
    logits = fixture_model.predict(golden["inputs"], verbose=0)
    assert logits.shape == golden["logits"].shape
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=tolerance(golden["logits"]))


def test_stage_outputs_match_official(fixture_model, golden):
    from tfgcvit import feature_extractor

    features = feature_extractor(fixture_model).predict(golden["inputs"], verbose=0)
    assert sorted(features) == ["stage0", "stage1", "stage2", "stage3"]
    for name, value in features.items():
        assert value.shape == golden[name].shape, name
        np.testing.assert_allclose(value, golden[name], rtol=0, atol=tolerance(golden[name]), err_msg=name)


def test_final_norm_matches_official(fixture_state_dict, golden):
    from tfgcvit import GCViT, load_torch_weights

    config = dict(FIXTURE_CONFIG, include_top=False, pooling=None)
    model = GCViT(**config)
    load_torch_weights(model, fixture_state_dict)  # skips the head by itself
    norm = model.predict(golden["inputs"], verbose=0)
    np.testing.assert_allclose(norm, golden["norm"], rtol=0, atol=tolerance(golden["norm"]))


def test_ema_weights_are_a_different_model(fixture_ema_state_dict, golden):
    from tfgcvit import GCViT, load_torch_weights

    model = GCViT(**FIXTURE_CONFIG)
    load_torch_weights(model, fixture_ema_state_dict)
    logits = model.predict(golden["inputs"], verbose=0)
    assert np.max(np.abs(logits - golden["logits"])) > 100 * tolerance(golden["logits"])


def test_preprocess_input_reproduces_fixture_inputs(golden):
    from tfgcvit import preprocess_input

    np.testing.assert_allclose(preprocess_input(golden["pixels"]), golden["inputs"], rtol=0, atol=1e-5)


def test_compiled_call_matches_official(fixture_model, golden):
    """Under XLA (tf.function(jit_compile=True)) or jax.jit; torch runs eagerly."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        call = tf.function(lambda x: fixture_model(x, training=False), jit_compile=True)
        logits = call(tf.constant(golden["inputs"])).numpy()
    elif backend == "jax":
        import jax

        state = (
            [v.value for v in fixture_model.trainable_variables],
            [v.value for v in fixture_model.non_trainable_variables],
        )

        @jax.jit
        def call(trainable, non_trainable, x):
            outputs, _ = fixture_model.stateless_call(trainable, non_trainable, x, training=False)
            return outputs

        logits = np.asarray(call(*state, golden["inputs"]))
    else:
        pytest.skip("PyTorch backend: no graph compiler is exercised here")
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=tolerance(golden["logits"]))
