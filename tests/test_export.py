"""Export for deployment: .keras, TensorFlow SavedModel, ONNX and TFLite, each against Keras.

The exported model is the fixture architecture with the fixture weights
(realistic magnitudes) built for variable input sizes, so one artifact is
checked on the golden 224 images (dynamic batch 2) and on odd sizes and
batches (97 x 131, batch 3; 64 x 80, batch 1).
"""

import os

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG, run_tflite, tflite_interpreter, tolerance

BACKEND = keras.backend.backend()
only_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow", reason="exports from TensorFlow")


def keras_outputs(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


@pytest.fixture(scope="module")
def dynamic_model(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights

    model = GCViT(**FIXTURE_CONFIG, input_shape=(None, None, 3))
    return load_torch_weights(model, fixture_state_dict)


SMALL_SHAPE = (1, 64, 80, 3)


@pytest.fixture(scope="module")
def cases(dynamic_model, golden):
    """(images, Keras logits) pairs: several batch sizes and image sizes.

    JAX compiles every new shape for tens of seconds on a small CPU, so the
    other backends check one small odd-sized case (and golden logits directly).
    """
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=SMALL_SHAPE).astype("float32")]
    if BACKEND == "tensorflow":
        inputs += [golden["inputs"], rng.normal(size=(3, 97, 131, 3)).astype("float32")]
    return [(images, keras_outputs(dynamic_model, images)) for images in inputs]


@only_tensorflow
def test_dynamic_model_reproduces_golden(cases, golden):
    # The reference every export is compared with is itself right.
    np.testing.assert_allclose(cases[1][1], golden["logits"], rtol=0,
                               atol=tolerance(golden["logits"]))


# ---------------------------------------------------------------------------
# .keras (every backend).


@pytest.mark.backends
def test_keras_file_round_trip(dynamic_model, cases, tmp_path):
    path = tmp_path / "gcvit.keras"
    dynamic_model.save(path)
    restored = keras.models.load_model(path)  # safe mode: all layers are registered
    for images, expected in cases:
        np.testing.assert_array_equal(keras_outputs(restored, images), expected)
    assert os.path.getsize(path) > 4 * dynamic_model.count_params()  # float32 weights inside


@pytest.mark.backends
def test_keras_file_round_trip_of_finetune_recipe(tmp_path):
    """uint8 -> Lambda(preprocess_input) -> backbone -> Dense: needs custom_objects to load."""
    from tfgcvit import GCViT, preprocess_input

    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = keras.layers.Lambda(preprocess_input)(inputs)
    backbone = GCViT(**dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1)), include_top=False,
                     pooling="avg", input_shape=(None, None, 3))
    outputs = keras.layers.Dense(3, activation="softmax", name="head", dtype="float32")(backbone(x))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "finetuned.keras"
    model.save(path)
    restored = keras.models.load_model(path, custom_objects={"preprocess_input": preprocess_input})
    images = np.random.default_rng(1).integers(0, 256, SMALL_SHAPE, dtype="uint8")
    np.testing.assert_array_equal(keras_outputs(restored, images), keras_outputs(model, images))


# ---------------------------------------------------------------------------
# TensorFlow SavedModel.


@only_tensorflow
def test_saved_model_serves_dynamic_batch_and_size(dynamic_model, cases, tmp_path):
    import tensorflow as tf

    path = tmp_path / "saved_model"
    dynamic_model.export(str(path), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(path))
    signature = served.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["image"]
    assert spec.shape.as_list() == [None, None, None, 3]
    for images, expected in cases:
        np.testing.assert_allclose(served.serve(images).numpy(), expected, rtol=0, atol=1e-5)
        (output,) = signature(image=tf.constant(images)).values()
        np.testing.assert_allclose(output.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.backends
def test_saved_model_from_jax(dynamic_model, cases, golden, tmp_path):
    if BACKEND != "jax":
        pytest.skip("the JAX path of export_model (jax2tf); TensorFlow is tested above")
    import tensorflow as tf

    from tfgcvit.export import export_model

    path = export_model(dynamic_model, tmp_path / "saved_model_jax")
    served = tf.saved_model.load(str(path))
    (images, expected), = cases
    np.testing.assert_allclose(served.serve(images).numpy(), expected, rtol=0, atol=1e-5)
    # Another batch and size, checked against the official golden logits.
    np.testing.assert_allclose(served.serve(golden["inputs"]).numpy(), golden["logits"], rtol=0,
                               atol=tolerance(golden["logits"]))


# ---------------------------------------------------------------------------
# ONNX and TFLite (TensorFlow backend).


@only_tensorflow
def test_onnx_runs_in_onnxruntime_with_dynamic_batch_and_size(fixture_state_dict, cases, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from tfgcvit import GCViT, load_torch_weights
    from tfgcvit.export import export_model, quantize_onnx

    # A fresh copy that never ran: Keras' ONNX exporter alone refuses such a
    # model ("has never called"); export_model runs it once first.
    model = load_torch_weights(GCViT(**FIXTURE_CONFIG, input_shape=(None, None, 3)),
                               fixture_state_dict)
    path = export_model(model, tmp_path / "gcvit.onnx", format="onnx")
    # The layer norms are LayerNormalization nodes, the GELUs in ONNX Runtime's form (optimize_onnx).
    _assert_norms_fused(_op_counts(path), _layer_norm_count(model))
    _assert_gelus_divide(path)
    _assert_blocks_channels_last(path)
    _assert_projections_split(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert feed.shape[0] != 1 and not isinstance(feed.shape[1], int)  # symbolic dimensions
    for images, expected in cases:
        (output,) = session.run(None, {feed.name: images})
        np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)

    # int8 dynamic quantisation: same top-1 on the golden images, logits within 0.5
    # (measured: 0.11 at most, on logits up to 2.9; bench/onnx_int8.py). By default
    # the dense layers' MatMuls only: ONNX Runtime has no fast ConvInteger.
    images, expected = cases[1]
    for options, quantized_ops in [({}, {"MatMulInteger"}),
                                   ({"op_types": ("MatMul", "Conv")}, {"MatMulInteger", "ConvInteger"})]:
        quantized = quantize_onnx(path, tmp_path / "gcvit_int8.onnx", **options)
        counts = _op_counts(quantized)
        assert {op for op in ("MatMulInteger", "ConvInteger") if counts[op]} == quantized_ops
        session = onnxruntime.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {feed.name: images})
        np.testing.assert_array_equal(output.argmax(-1), expected.argmax(-1))
        assert np.max(np.abs(output - expected)) < 0.5
    with pytest.raises(FileNotFoundError, match="No ONNX file at"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    for bad in ([], ["Convolution"]):
        with pytest.raises(ValueError, match="op_types=.*give one or more of"):
            quantize_onnx(path, tmp_path / "out.onnx", op_types=bad)
    assert not (tmp_path / "out.onnx").exists()


@only_tensorflow
def test_keras_own_onnx_export_runs_in_onnxruntime(dynamic_model, cases, tmp_path):
    """`model.export(format="onnx")` itself (tf2onnx), no tfgcvit helper: no Erfc."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    path = tmp_path / "keras_own.onnx"
    dynamic_model.export(str(path), format="onnx", verbose=False)
    graph = onnx.load(str(path)).graph
    op_types = {node.op_type for node in graph.node}
    assert "Erf" in op_types and not {"Erfc", "If"} & op_types
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert not any(isinstance(size, int) for size in feed.shape[:3])  # dynamic batch, height, width
    for images, expected in cases:
        (output,) = session.run(None, {feed.name: images})
        np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)

    # Keras' file has each norm as ten nodes and GELUs that ONNX Runtime does not fuse;
    # optimize_onnx rewrites both (opset 15 -> 17).
    from tfgcvit.export import optimize_onnx

    norms = _layer_norm_count(dynamic_model)
    assert "LayerNormalization" not in op_types and _op_counts(path)["Sqrt"] == norms + 1
    assert _ort_fused_gelus(path) == 0
    fused = tmp_path / "fused.onnx"
    rewritten = optimize_onnx(path, fused)
    counts = _op_counts(fused)
    transposes_removed = _op_counts(path)["Transpose"] - counts["Transpose"]
    shared = rewritten.pop("shared")
    assert rewritten == {"layer_norms": counts["LayerNormalization"], "gelus": counts["Erf"],
                         "attention": _multi_head_attentions(), "transposes": transposes_removed,
                         "projections": sum(FIXTURE_CONFIG["depths"])}
    assert transposes_removed > 0  # and none is left around a block norm (below)
    # Every block's shapes read once per level, not once per block (outputs checked below).
    assert shared > 0 and counts["Shape"] < _op_counts(path)["Shape"] - sum(FIXTURE_CONFIG["depths"])
    _assert_projections_split(fused)
    _assert_norms_fused(counts, norms)
    _assert_gelus_divide(fused)
    _assert_blocks_channels_last(fused)
    assert _ort_fused_gelus(fused) == counts["Erf"]  # every GELU, channels-first ones too
    assert max(o.version for o in onnx.load(str(fused)).opset_import if o.domain in ("", "ai.onnx")) == 17
    session = onnxruntime.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    for images, expected in cases:
        (output,) = session.run(None, {feed.name: images})
        np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="No ONNX file at"):
        optimize_onnx(tmp_path / "missing.onnx")


def _assert_norms_fused(counts, norms):
    """Every block norm fused; Keras' final norm (another form) left whole.

    tf2onnx's layout of the norms varies between processes (hash order): under
    15 PYTHONHASHSEED values, 3 exports had 1-2 norms with the mean reshaped away
    and back, which `optimize_onnx` now follows too.
    """
    assert counts["LayerNormalization"] == norms
    assert counts["Sqrt"] == counts["Reciprocal"] == 1


def _assert_gelus_divide(path):
    """Every GELU's erf argument is x / sqrt(2), the form ONNX Runtime fuses."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    erfs = [node for node in graph.node if node.op_type == "Erf"]
    assert erfs and all(producer[node.input[0]].op_type == "Div" for node in erfs)


def _assert_projections_split(path):
    """No attention slices its projection into queries, keys and values: each has its own product."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}

    def made_by(name, op_types):
        node = producer.get(name)
        return node if node is not None and node.op_type in op_types else None

    sliced = [node.name for node in graph.node if node.op_type in ("Slice", "Split")
              and (reshape := made_by(node.input[0], ("Reshape",)))
              and (made_by(reshape.input[0], ("MatMul", "Gemm"))
                   or ((add := made_by(reshape.input[0], ("Add",))) and any(made_by(i, ("MatMul",)) for i in add.input)))]
    assert sliced == []


def _multi_head_attentions():
    return sum(depth for depth, heads in zip(FIXTURE_CONFIG["depths"], FIXTURE_CONFIG["num_heads"]) if heads > 1)


def _moves_one_axis(perm):
    """Whether a transpose moves a single axis (the moves runtimes have fast kernels for):
    without that axis, the others keep their order."""
    return any(rest == sorted(rest) for rest in ([a for a in perm if a != axis] for axis in perm))


def _assert_blocks_channels_last(path):
    """No block norm reads or feeds a transpose, no transpose reads another, and every
    transpose moves a single axis (the attention runs batch first)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    norms = [node for node in graph.node if node.op_type == "LayerNormalization" and "/blocks_" in node.name]
    assert norms
    for norm in norms:
        assert producer[norm.input[0]].op_type != "Transpose", norm.name
        assert all(reader.op_type != "Transpose" for reader in readers[norm.output[0]]), norm.name
    transposes = [node for node in graph.node if node.op_type == "Transpose"]
    assert not [node.name for node in transposes
                if node.input[0] in producer and producer[node.input[0]].op_type == "Transpose"]
    # The fixture's first level has one head: tf2onnx writes its head merge as a Reshape,
    # so it is not matched (every official variant has 2 or more).
    single_head = tuple(f"levels_{i}_" for i, heads in enumerate(FIXTURE_CONFIG["num_heads"]) if heads == 1)
    perms = [list(a.ints) for node in transposes for a in node.attribute
             if a.name == "perm" and not ("/attn_" in node.name and any(s in node.name for s in single_head))]
    assert perms and [perm for perm in perms if not _moves_one_axis(perm)] == []


def _ort_fused_gelus(path):
    """How many Gelu kernels ONNX Runtime makes of the file's nodes."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path) + ".ort.onnx"
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = _op_counts(options.optimized_model_filepath)
    return counts["Gelu"] + counts["BiasGelu"]


def _op_counts(path):
    import collections

    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _layer_norm_count(model):
    """The blocks' norms (`layers.LayerNorm`); Keras' own final norm is written in another form."""
    from tfgcvit.model.layers import LayerNorm

    return sum(isinstance(layer, LayerNorm) for layer in model._flatten_layers())


@only_tensorflow
def test_tflite_runs_with_dynamic_batch_and_size(dynamic_model, cases, tmp_path):
    from tfgcvit.export import export_model

    path = export_model(dynamic_model, tmp_path / "gcvit.tflite", format="litert")
    interpreter = tflite_interpreter(path)
    (feed,) = interpreter.get_input_details()
    assert list(feed["shape_signature"]) == [-1, -1, -1, 3]
    # Builtin ops only (no Flex/Select TF ops), so plain LiteRT runs it.
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "GELU" in op_names and not any(name.startswith("Flex") for name in op_names)
    for images, expected in cases:
        np.testing.assert_allclose(run_tflite(path, images), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Unsupported combinations fail early with a clear message.


@pytest.fixture(scope="module")
def small_model():
    from tfgcvit import GCViT

    return GCViT(**dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1)), input_shape=(None, None, 3))


@pytest.mark.backends
def test_unknown_format_is_rejected(small_model, tmp_path):
    from tfgcvit.export import export_model

    with pytest.raises(ValueError, match="Unknown export format 'coreml'; choose one of"):
        export_model(small_model, tmp_path / "m", format="coreml")


@pytest.mark.backends
@pytest.mark.parametrize("format", ["tf_saved_model", "onnx", "litert"])
def test_unsupported_backend_says_what_to_do(small_model, tmp_path, format):
    from tfgcvit.export import BACKENDS, export_model

    if BACKEND in BACKENDS[format]:
        pytest.skip(f"{format} is supported on {BACKEND}")
    with pytest.raises(ValueError, match=rf"works on the .* backend, not '{BACKEND}'") as error:
        export_model(small_model, tmp_path / "m", format=format)
    assert "KERAS_BACKEND=tensorflow" in str(error.value)
    assert not (tmp_path / "m").exists()


@only_tensorflow
def test_bad_options_are_rejected_before_tracing(small_model, tmp_path):
    from tfgcvit.export import export_model

    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['opset_version'\] for format 'tf_saved_model'"):
        export_model(small_model, tmp_path / "m", format="tf_saved_model", opset_version=17)
    with pytest.raises(ValueError, match="opset_version` must be an integer >= 13"):
        export_model(small_model, tmp_path / "m.onnx", format="onnx", opset_version=9)
    with pytest.raises(ValueError, match="needs opset_version >= 17"):
        export_model(small_model, tmp_path / "m.onnx", format="onnx", opset_version=15)
    with pytest.raises(ValueError, match="optimize` must be True or False"):
        export_model(small_model, tmp_path / "m.onnx", format="onnx", optimize="yes")
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
        export_model(small_model, tmp_path / "m", input_signature=[keras.InputSpec(shape=(None, 64, 64, 4))])
    with pytest.raises(ValueError, match="height 16 is below the minimum of 32"):
        export_model(small_model, tmp_path / "m", input_signature=[keras.InputSpec(shape=(1, 16, 64, 3))])
    assert not any(tmp_path.iterdir())


@only_tensorflow
def test_fixed_size_model_rejects_other_signature(tmp_path):
    from tfgcvit import GCViT
    from tfgcvit.export import export_model

    model = GCViT(**dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1)), input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="input_shape=\\(None, None, 3\\)"):
        export_model(model, tmp_path / "m", input_signature=[keras.InputSpec(shape=(None, 96, 96, 3))])


@only_tensorflow
def test_mixed_precision_model_is_rejected_for_onnx_and_tflite(tmp_path):
    from tfgcvit import GCViT
    from tfgcvit.export import export_model

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = GCViT(**dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1)), input_shape=(64, 64, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    for format in ("onnx", "litert"):
        with pytest.raises(ValueError, match=r"needs a float32 model.*\['bfloat16'\].*set_weights"):
            export_model(model, tmp_path / f"m.{format}", format=format)


@pytest.mark.parametrize("back_to_its_shape", [True, False])
def test_optimize_onnx_follows_a_mean_reshaped_away_and_back(tmp_path, back_to_its_shape):
    """tf2onnx sometimes moves a norm's mean through Unsqueeze/Reshape/Squeeze/Reshape
    (hash order); fused when the chain returns to the mean's shape, else left alone."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tfgcvit.export import optimize_onnx

    channels, rng = 8, np.random.default_rng(0)
    constants = {
        "eps": np.array(1e-5, np.float32), "zero": np.array([0], np.int64),
        "gamma": rng.uniform(0.5, 1.5, (1, channels, 1, 1)).astype(np.float32),
        "beta": rng.standard_normal((1, channels, 1, 1)).astype(np.float32),
        "to_6d": np.array([1, 1, -1, 0, 0, 1], np.int64),
        # Back to (N, 1, H, W), or to (1, N, H, W), which is another tensor.
        "to_4d": np.array([-1, 1, 0, 0] if back_to_its_shape else [1, -1, 0, 0], np.int64),
    }
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Unsqueeze", ["mean", "zero"], ["m5"]),
        helper.make_node("Reshape", ["m5", "to_6d"], ["m6"]),
        helper.make_node("Squeeze", ["m6", "zero"], ["m5b"]),
        helper.make_node("Reshape", ["m5b", "to_4d"], ["m4"]),
        helper.make_node("Sub", ["x", "m4"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["inv", "gamma"], ["scale"]),
        helper.make_node("Mul", ["d", "scale"], ["normed"]),
        helper.make_node("Add", ["normed", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    path, rewritten = tmp_path / "norm.onnx", tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))

    counts = optimize_onnx(path, rewritten)
    assert counts["layer_norms"] == int(back_to_its_shape)
    assert _op_counts(rewritten)["Sqrt"] == int(not back_to_its_shape)
    x = rng.standard_normal((1, channels, 3, 5)).astype(np.float32)  # batch 1: both graphs run
    outputs = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
               for p in (path, rewritten)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-5)
    if back_to_its_shape:
        mean, std = x.mean(1, keepdims=True), x.std(1, keepdims=True)
        expected = (x - mean) / np.sqrt(std**2 + 1e-5) * constants["gamma"] + constants["beta"]
        np.testing.assert_allclose(outputs[1], expected, rtol=0, atol=1e-5)


def test_optimize_onnx_moves_transposes_until_they_cancel(tmp_path):
    """The moves of `_Rewrite.cancel_transposes` on a hand-built graph in tf2onnx's layout:
    a channels-first residual add and gate read back channels last, a padding run
    channels first and read back channels last and by Shape."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tfgcvit.export import optimize_onnx

    to_nchw, to_nhwc = [0, 3, 1, 2], [0, 2, 3, 1]
    nodes = [
        helper.make_node("Transpose", ["a"], ["a_nchw"], perm=to_nchw),
        helper.make_node("Transpose", ["b"], ["b_nchw"], perm=to_nchw),
        helper.make_node("Add", ["a_nchw", "b_nchw"], ["sum"]),  # both inputs transposed
        helper.make_node("Mul", ["sum", "gate"], ["gated"]),  # one: the gate is (N, C, 1, 1)
        helper.make_node("Transpose", ["gated"], ["y"], perm=to_nhwc),  # a graph output
        helper.make_node("Pad", ["a_nchw", "pads"], ["padded"]),
        helper.make_node("Transpose", ["padded"], ["padded_nhwc"], perm=to_nhwc),
        helper.make_node("Shape", ["padded"], ["padded_shape"]),
        helper.make_node("Relu", ["padded_nhwc"], ["z"]),
        helper.make_node("Transpose", ["a_nchw"], ["a_nhcw"], perm=[0, 2, 1, 3]),  # does not undo it
    ]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3, 5, 4]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3, 5, 4]),
              helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["n", 4, 1, 1])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "a_nhcw")]
    outputs.append(helper.make_tensor_value_info("padded_shape", TensorProto.INT64, None))
    pads = numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64), "pads")  # NCHW order
    graph = helper.make_graph(nodes, "stream", inputs, outputs, [pads])
    path, rewritten = tmp_path / "stream.onnx", tmp_path / "moved.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    # 5 transposes -> 2: the gate's (small) and the one that does not cancel, now read from a.
    assert optimize_onnx(path, rewritten)["transposes"] == 3
    graph = onnx.load(str(rewritten)).graph
    producer = {out: node for node in graph.node for out in node.output}
    transposes = [node for node in graph.node if node.op_type == "Transpose"]
    assert sorted((node.input[0], list(node.attribute[0].ints)) for node in transposes) == [
        ("a", [0, 1, 3, 2]), ("gate", to_nhwc)]
    assert producer["y"].op_type == "Identity"  # kept, as the graph output's name
    assert producer["z"].op_type == "Relu" and producer[producer["z"].input[0]].op_type == "Pad"
    assert producer[producer["padded_shape"].input[0]].op_type == "Shape"  # Gather(Shape(pad))
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2, 3, 5, 4)).astype(np.float32),
            "b": rng.standard_normal((2, 3, 5, 4)).astype(np.float32),
            "gate": rng.standard_normal((2, 4, 1, 1)).astype(np.float32)}
    before, after = (onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)
                     for p in (path, rewritten))
    np.testing.assert_allclose(
        before[0], ((feed["a"] + feed["b"]).transpose(0, 3, 1, 2) * feed["gate"]).transpose(0, 2, 3, 1),
        rtol=0, atol=1e-6)
    np.testing.assert_array_equal(before[3], [2, 4, 3 + 4, 5 + 2])
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("read_outside", [False, True])
def test_optimize_onnx_runs_attention_batch_first(tmp_path, read_outside):
    """Heads-first attention as tf2onnx writes it becomes batch first, every transpose a
    one-axis move; left alone when a tensor inside is also read outside."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tfgcvit.export import optimize_onnx

    windows, tokens, heads, dim, rng = 6, 4, 2, 3, np.random.default_rng(0)
    constants = {
        "scale": np.array(dim**-0.5, np.float32),
        "bias": rng.standard_normal((heads, 1, tokens, tokens)).astype(np.float32),
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
        "two": np.array([2], np.int64), "three": np.array([3], np.int64),
    }
    nodes = [helper.make_node("Transpose", ["qkv"], ["heads_first"], perm=[2, 3, 0, 1, 4])]
    for part, (start, end) in zip("qkv", [("zero", "one"), ("one", "two"), ("two", "three")]):
        nodes += [helper.make_node("Slice", ["heads_first", start, end], [f"{part}5"]),
                  helper.make_node("Squeeze", [f"{part}5", "zero"], [part])]
    nodes += [
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["logits"]),
        helper.make_node("Mul", ["logits", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "v"], ["mixed"]),
        helper.make_node("Transpose", ["mixed"], ["y"], perm=[1, 2, 0, 3]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in (["y", "attention"] if read_outside else ["y"])]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["bw", tokens, 3, heads, dim])],
        outputs, [numpy_helper.from_array(value, name) for name, value in constants.items()])
    path, rewritten = tmp_path / "attention.onnx", tmp_path / "batch_first.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    assert optimize_onnx(path, rewritten)["attention"] == int(not read_outside)
    perms = [list(node.attribute[0].ints) for node in onnx.load(str(rewritten)).graph.node
             if node.op_type == "Transpose"]
    assert all(_moves_one_axis(perm) for perm in perms) != read_outside
    qkv = rng.standard_normal((windows, tokens, 3, heads, dim)).astype(np.float32)
    before, after = (onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"qkv": qkv})
                     for p in (path, rewritten))
    q, k, v = qkv.transpose(2, 3, 0, 1, 4)
    logits = q @ k.swapaxes(-1, -2) * constants["scale"] + constants["bias"]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True) @ v).transpose(1, 2, 0, 3)
    np.testing.assert_allclose(before[0], expected, rtol=0, atol=1e-5)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-6)


@pytest.mark.parametrize("unstacked", [False, True])
@pytest.mark.parametrize("read_outside", [False, True])
def test_optimize_onnx_splits_projections_into_parts(tmp_path, read_outside, unstacked):
    """A projection sliced into queries, keys and values on a middle axis (tf2onnx's
    form after the transposes move; for `ops.unstack` tf2onnx writes one Split and
    a Squeeze per part) becomes one product per part; left alone when the sliced
    tensor is read elsewhere too."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tfgcvit.export import optimize_onnx

    tokens, heads, dim, rng = 4, 2, 3, np.random.default_rng(0)
    channels = heads * dim
    constants = {
        "w": rng.standard_normal((channels, 3 * channels)).astype(np.float32),
        "b": rng.standard_normal(3 * channels).astype(np.float32),
        "target": np.array([-1, tokens, 3, heads, dim], np.int64),
        "axis": np.array([2], np.int64),
    }
    nodes = [helper.make_node("MatMul", ["x", "w"], ["projected"]),
             helper.make_node("Add", ["b", "projected"], ["biased"]),  # the bias first, as written by some
             helper.make_node("Reshape", ["biased", "target"], ["parts"])]
    if unstacked:
        nodes.append(helper.make_node("Split", ["parts"], ["q5", "k5", "v5"], axis=2))
    for index, part in enumerate("qkv"):
        constants[f"start{index}"] = np.array([index], np.int64)
        constants[f"end{index}"] = np.array([index + 1], np.int64)
        if not unstacked:
            nodes.append(helper.make_node("Slice", ["parts", f"start{index}", f"end{index}", "axis"], [f"{part}5"]))
        nodes.append(helper.make_node("Squeeze", [f"{part}5", "axis"], [part]))
    names = ["q", "k", "v"] + (["parts"] if read_outside else [])
    graph = helper.make_graph(
        nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", channels])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    path, rewritten = tmp_path / "projection.onnx", tmp_path / "split.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    assert optimize_onnx(path, rewritten)["projections"] == int(not read_outside)
    ops = _op_counts(rewritten)
    assert (ops["MatMul"], ops["Slice"], ops["Split"]) == ((1, 3, 0) if read_outside else (3, 0, 0))
    x = rng.standard_normal((2 * tokens, channels)).astype(np.float32)
    before, after = (onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})
                     for p in (path, rewritten))
    expected = (x @ constants["w"] + constants["b"]).reshape(-1, tokens, 3, heads, dim)
    for index in range(3):
        np.testing.assert_allclose(before[index], expected[:, :, index], rtol=0, atol=1e-5)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-6)


def test_optimize_onnx_computes_each_shape_once(tmp_path):
    """Shape nodes whose inputs have the same shape by symbolic inference, and nodes that
    repeat another's computation, go; a shape that differs, and graph outputs, stay."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tfgcvit.export import optimize_onnx

    nodes = [
        helper.make_node("Add", ["x", "one"], ["y"]),  # the shape of x, by inference only
        helper.make_node("Concat", ["x", "x"], ["doubled"], axis=0),  # another shape
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Shape", ["y"], ["y_shape"]),
        helper.make_node("Shape", ["doubled"], ["doubled_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["x_rows"], axis=0),
        helper.make_node("Gather", ["y_shape", "zero_again"], ["y_rows"], axis=0),  # the same, twice
        helper.make_node("Gather", ["doubled_shape", "zero"], ["doubled_rows"], axis=0),
        helper.make_node("Add", ["x_rows", "y_rows"], ["rows"]),
        helper.make_node("Add", ["rows", "doubled_rows"], ["total"]),
        helper.make_node("Neg", ["y"], ["z"]),
        helper.make_node("Neg", ["y"], ["z_again"]),  # a graph output: kept
    ]
    constants = {"one": np.array(1.0, np.float32), "zero": np.array([0], np.int64),
                 "zero_again": np.array([0], np.int64)}
    graph = helper.make_graph(
        nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in ("total",)]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("z", "z_again")],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    path, rewritten = tmp_path / "shapes.onnx", tmp_path / "once.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    assert optimize_onnx(path, rewritten)["shared"] == 2  # y's Shape and its Gather
    ops = _op_counts(rewritten)
    assert (ops["Shape"], ops["Gather"], ops["Neg"]) == (2, 2, 2)
    assert len(onnx.load(str(rewritten)).graph.initializer) == 2  # one zero
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    before, after = (onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})
                     for p in (path, rewritten))
    np.testing.assert_array_equal(before[0], [4 + 4 + 8])
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)
