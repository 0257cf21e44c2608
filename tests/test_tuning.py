"""Machine-specific tuning (`tfgcvit.model.tuning`): its switches, its decision, and its absence from exports.

Also that importing and running tfgcvit loads no other backend's framework.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG, REPO
from tfgcvit.model import tuning

BACKEND = keras.backend.backend()
only_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow", reason="the tuning is TensorFlow's")
SMALL_CONFIG = dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1))
SCOPE = "row_halves"  # the name scope of the split ops (tfgcvit.model.layers._by_row_halves)


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("1", "auto"), ("0", "off"),
                                            (" OFF ", "off"), ("force", "on")])
def test_environment_variable_sets_the_mode(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(tuning.ENV_VAR, value)
    assert tuning.mode() == expected


def test_bad_values_are_rejected(monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, "yes please")
    with pytest.raises(ValueError, match="TFGCVIT_MACHINE_TUNING='yes please' is not understood"):
        tuning.mode()
    with pytest.raises(ValueError, match="Unknown tuning mode 'fast'"):
        with tuning.setting("fast"):
            pass


def test_context_managers_win_over_the_environment_and_nest(monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, "force")
    with tuning.disabled():
        assert tuning.mode() == "off" and not tuning.row_halves()
        with tuning.setting("auto"):
            assert tuning.mode() == "auto"
        assert tuning.mode() == "off"
    assert tuning.mode() == "on"


@pytest.mark.parametrize("threads", [1, 2, 4, 16])
@pytest.mark.parametrize("pays_off", [True, False])
def test_auto_mode_decides_from_threads_and_the_measurement(monkeypatch, threads, pays_off):
    monkeypatch.setattr(tuning, "tensorflow_threads", lambda: threads)
    monkeypatch.setattr(tuning, "row_halves_pay_off", lambda: pays_off)
    with tuning.setting("auto"):
        assert tuning.row_halves() is (pays_off and threads >= 2 and BACKEND == "tensorflow")
    with tuning.setting("on"):
        assert tuning.row_halves() is (BACKEND == "tensorflow")


@only_tensorflow
def test_the_measurement_runs_once_and_eagerly_from_inside_a_trace(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tuning, "PROBE_ROUNDS", 1)
    tuning.row_halves_pay_off.cache_clear()
    try:
        answers = []
        tf.function(lambda: answers.append(tuning.row_halves_pay_off()) or tf.constant(0))()
        assert answers[0] in (True, False)
        assert tuning.row_halves_pay_off.cache_info().misses == 1
        assert tuning.row_halves_pay_off() is answers[0]
        assert tuning.row_halves_pay_off.cache_info().misses == 1
    finally:
        tuning.row_halves_pay_off.cache_clear()


def graph_node_names(graph_def):
    """Node names and op types of a GraphDef and of every function in its library."""
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    return [node.name for node in nodes], [node.op for node in nodes]


def traced_node_names(model, mode):
    import tensorflow as tf

    with tuning.setting(mode):
        function = tf.function(lambda x: model(x, training=False))
        graph = function.get_concrete_function(tf.TensorSpec((None, None, None, 3))).graph
    return graph_node_names(graph.as_graph_def())


@pytest.fixture(scope="module")
def small_model():
    from tfgcvit import GCViT

    model = GCViT(**SMALL_CONFIG, input_shape=(None, None, 3))
    model(np.zeros((1, 64, 64, 3), "float32"), training=False)
    return model


@only_tensorflow
def test_row_halves_are_in_the_graph_only_when_tuned(small_model):
    names, ops = traced_node_names(small_model, "on")
    assert any(SCOPE in name for name in names) and "If" in ops  # unknown batch: a runtime cond
    names, ops = traced_node_names(small_model, "off")
    assert not any(SCOPE in name for name in names)
    assert not {"If", "StatelessIf"} & set(ops)


@only_tensorflow
@pytest.mark.parametrize("exporter", ["tfgcvit.export.export_model", "keras Model.export"])
def test_saved_model_export_has_no_row_halves_even_when_forced(small_model, tmp_path, exporter):
    from tensorflow.core.protobuf import saved_model_pb2

    from tfgcvit.export import export_model

    with tuning.setting("on"):
        if exporter == "keras Model.export":
            small_model.export(str(tmp_path / "saved_model"), format="tf_saved_model", verbose=False)
        else:
            export_model(small_model, tmp_path / "saved_model")
    saved = saved_model_pb2.SavedModel.FromString((tmp_path / "saved_model" / "saved_model.pb").read_bytes())
    names, ops = graph_node_names(saved.meta_graphs[0].graph_def)
    assert "MatMul" in ops or "BatchMatMulV2" in ops  # the model is in there
    assert not any(SCOPE in name for name in names)
    assert not {"If", "StatelessIf"} & set(ops)


@pytest.mark.parametrize("backend,absent", [("tensorflow", ("jax", "torch")), ("torch", ("jax",))])
def test_import_and_run_load_no_other_backend(backend, absent):
    """With JAX installed, TensorFlow and Keras would import it; tfgcvit keeps it out."""
    pytest.importorskip("jax")
    pytest.importorskip(backend)
    code = (
        "import sys, numpy as np, tfgcvit\n"
        f"m = tfgcvit.GCViT(**{SMALL_CONFIG!r}, input_shape=(64, 64, 3))\n"
        "m.predict(np.zeros((1, 64, 64, 3), 'float32'), verbose=0)\n"
        "from tfgcvit import export\n"
        f"print(sorted(set({absent!r}) & set(sys.modules)))\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_jax_backend_still_gets_jax():
    pytest.importorskip("jax")
    code = ("import sys, tfgcvit, keras, tensorflow\n"
            "print(sys.modules['tensorflow.lite.python.util']._jit is not None)")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.backends
def test_shifted_depthwise_is_decided_from_the_backend_and_device():
    with tuning.setting("auto"):
        expected = BACKEND == "jax" and __import__("jax").default_backend() == "cpu"
        assert tuning.shifted_depthwise() == expected
    with tuning.disabled():
        assert tuning.shifted_depthwise() is False
    with tuning.setting("on"):
        assert tuning.shifted_depthwise() == (BACKEND == "jax")


@pytest.mark.backends
@pytest.mark.skipif(BACKEND != "jax", reason="the shifted depthwise form is JAX's")
def test_shifted_depthwise_equals_the_convolution_with_gradients():
    import jax

    from tfgcvit.model import layers

    block = layers.MBConv()
    block.build((None, 9, 11, 16))
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal((2, 9, 11, 16)).astype("float32"))

    def loss(variables, inputs):
        outputs, _ = block.stateless_call(variables, [], inputs)
        return keras.ops.sum(outputs**2), outputs

    variables = [v.value for v in block.trainable_variables]
    results = {}
    for name, context in (("shifted", tuning.setting("on")), ("convolution", tuning.disabled())):
        with context:
            (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(variables, x)
        results[name] = (np.asarray(outputs), [np.asarray(g) for g in grads])
    (shifted, shifted_grads), (conv, conv_grads) = results["shifted"], results["convolution"]
    assert not np.array_equal(shifted, conv)  # two computations, not one twice
    np.testing.assert_allclose(shifted, conv, rtol=1e-5, atol=1e-5)
    for a, b in zip(shifted_grads, conv_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
