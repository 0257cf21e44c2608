"""The forms of the layers (`tfgcvit.model.forms`): chosen from the target only, the reference
forms in exports, and each alternative form computing what the reference form computes."""

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG
from tfgcvit.model import forms, layers

BACKEND = keras.backend.backend()
SMALL_CONFIG = dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1))


def _jax_on_cpu():
    return BACKEND == "jax" and __import__("jax").default_backend() == "cpu"


@pytest.mark.backends
def test_forms_follow_the_target_table():
    assert forms.export_format() is None
    assert forms.shifted_depthwise() == _jax_on_cpu()
    assert forms.channels_first_view() == (BACKEND == "torch")
    assert forms.fewer_pass_layer_norm() == (BACKEND != "torch")
    with forms.exporting("tf_saved_model"):
        assert forms.export_format() == "tf_saved_model"
        assert forms.shifted_depthwise() is False  # a file gets the reference form
        with forms.exporting("onnx"):
            assert forms.export_format() == "onnx"
        assert forms.export_format() == "tf_saved_model"
    assert forms.export_format() is None and forms.shifted_depthwise() == _jax_on_cpu()


@pytest.mark.skipif(BACKEND == "torch", reason="Keras writes no SavedModel from PyTorch")
def test_export_model_traces_for_the_format_it_writes(tmp_path, monkeypatch):
    from tfgcvit import GCViT
    from tfgcvit.export import export_model

    model = GCViT(**SMALL_CONFIG, input_shape=(64, 64, 3))
    seen = []
    monkeypatch.setattr(model, "export", lambda *args, **kwargs: seen.append(forms.export_format()))
    export_model(model, tmp_path / "saved")
    assert seen == ["tf_saved_model"] and forms.export_format() is None


@pytest.mark.backends
@pytest.mark.skipif(BACKEND != "jax", reason="the shifted depthwise form is JAX's")
def test_shifted_depthwise_equals_the_convolution_with_gradients(monkeypatch):
    import jax

    block = layers.MBConv()
    block.build((None, 9, 11, 16))
    x = np.random.default_rng(0).standard_normal((2, 9, 11, 16)).astype("float32")
    x = keras.ops.convert_to_tensor(x)

    def loss(variables, inputs):
        outputs, _ = block.stateless_call(variables, [], inputs)
        return keras.ops.sum(outputs**2), outputs

    variables = [v.value for v in block.trainable_variables]
    results = {}
    for shifted in (True, False):
        monkeypatch.setattr(forms, "shifted_depthwise", lambda: shifted)
        (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(variables, x)
        results[shifted] = (np.asarray(outputs), [np.asarray(g) for g in grads])
    (shifted, shifted_grads), (conv, conv_grads) = results[True], results[False]
    assert not np.array_equal(shifted, conv)  # two computations, not one twice
    np.testing.assert_allclose(shifted, conv, rtol=1e-5, atol=1e-5)
    for a, b in zip(shifted_grads, conv_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
