"""Each example script runs end to end on tiny data (imported, called with small arguments).

examples/distributed.py needs a fresh process per engine and is run by
tests/test_distributed.py.
"""

import importlib.util
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import FIXTURES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHECKPOINT = str(FIXTURES / "custom_224.pth.tar")
BACKEND = keras.backend.backend()


def load_example(name):
    if str(EXAMPLES) not in sys.path:  # the examples import their shared module, synthetic_shapes
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"gcvit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_dtype_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


def test_finetune_example_with_fixture_weights(tmp_path, restore_dtype_policy):
    finetune = load_example("finetune")
    pytest.importorskip("tfgcvit.weights.checkpoint")
    saved = tmp_path / "finetuned.keras"
    model, history = finetune.main([
        "--variant", "mini", "--weights", CHECKPOINT, "--image-size", "64", "--classes", "3",
        "--steps", "2", "--batch-size", "2", "--run-eagerly", "--save", str(saved)])
    assert np.isfinite(history.history["loss"][0])
    assert model.output.shape == (None, 3)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype="uint8")
    import tfgcvit

    restored = keras.models.load_model(saved, custom_objects={"preprocess_input": tfgcvit.preprocess_input})
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(images)),
                               keras.ops.convert_to_numpy(model(images)), rtol=0, atol=1e-6)


def test_highres_example_resizes_fixture_tables():
    highres = load_example("highres")
    pytest.importorskip("tfgcvit.weights.checkpoint")
    from tfgcvit.weights.checkpoint import read_checkpoint
    from tfgcvit.weights.resize import resize_bias_table

    assert highres.windows_for(384) == (12, 12, 24, 12) and highres.windows_for(224) == (7, 7, 14, 7)
    model, outputs = highres.main(["--variant", "mini", "--weights", CHECKPOINT, "--size", "192"])
    assert outputs.shape == (1, 10) and np.all(np.isfinite(outputs))
    assert [model.get_layer(f"levels_{i}").window_size for i in range(4)] == [6, 6, 12, 6]
    table = model.get_layer("levels_2").blocks[1].attn.relative_position_bias_table
    source = read_checkpoint(CHECKPOINT)["levels.2.blocks.1.attn.relative_position_bias_table"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(table), resize_bias_table(source, 12),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        highres.windows_for(200)


# A few eager steps on a handful of 96x128 images (multiples of 32, not of the windows):
# eager steps are quicker than tracing the training graph for so few. The measured
# runs in docs/downstream.md train compiled.
TINY_RUN = ["--image-size", "96", "128", "--train-images", "6", "--test-images", "2", "--batch-size", "2",
            "--epochs", "2", "--run-eagerly"]


def test_detection_example_loss_falls():
    detection = load_example("detection")
    result = detection.main(TINY_RUN + ["--head-layers", "1"])
    losses = result["history"].history["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[1] < losses[0], losses
    assert 0.0 <= result["map50"] <= 1.0


def test_detection_decoding_and_map_recover_the_encoded_truth():
    """Anchors, box encoding, decoding, NMS and mAP agree: perfect head outputs give mAP 1."""
    detection, shapes = load_example("detection"), load_example("synthetic_shapes")
    from tfgcvit.hub import GCViTBackbone

    data = shapes.make_dataset(4, 96, 128, seed=0)
    encoder = GCViTBackbone(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=(7, 7, 14, 7))
    detector = detection.build_detector(encoder, num_classes=3, head_layers=1)
    images = shapes.normalize(data["images"])
    deltas, classes = (keras.ops.convert_to_numpy(t) for t in detector.label_encoder(
        images=images, gt_boxes=data["boxes"], gt_classes=data["labels"].astype("float32")))
    # Logits +10 for the class of each anchor matched to a true box, -10 elsewhere.
    logits = np.where(np.arange(3) == classes[..., None], 10.0, -10.0).astype("float32")
    predictions = keras.tree.map_structure(keras.ops.convert_to_numpy, detector.decode_predictions(
        {"bbox_regression": deltas, "cls_logits": logits}, images))
    assert detection.mean_average_precision(predictions, data["boxes"], data["labels"], 3) == 1.0


def test_segmentation_example_loss_falls():
    segmentation = load_example("segmentation")
    result = segmentation.main(TINY_RUN)
    losses = result["history"].history["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[1] < losses[0], losses
    assert 0.0 <= result["miou"] <= 1.0
    images = np.zeros((1, 96, 128, 3), "float32")
    assert keras.ops.convert_to_numpy(result["model"](images)).shape == (1, 96, 128, 4)


def test_mean_average_precision_and_mean_iou():
    detection, segmentation = load_example("detection"), load_example("segmentation")
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 40, 40]]], "float32")
    labels = np.array([[0, 1]])
    # Class 0 found once (plus a lower-scored duplicate, a false positive), class 1 missed.
    predictions = {"boxes": np.array([[[0, 0, 10, 11], [0, 0, 10, 10], [50, 50, 60, 60]]], "float32"),
                   "confidence": np.array([[0.9, 0.8, 0.7]]), "labels": np.array([[0, 0, 1]]),
                   "num_detections": np.array([3])}
    assert detection.mean_average_precision(predictions, boxes, labels, 2) == 0.5
    truth = np.array([[0, 0, 1, 1]])
    assert segmentation.mean_iou(truth, np.array([[0, 1, 1, 1]]), 2) == (0.5 + 2 / 3) / 2


@pytest.mark.skipif(BACKEND != "tensorflow", reason="ONNX and TFLite export from TensorFlow")
def test_export_example(tmp_path):
    export = load_example("export")
    # One block per stage keeps the exports quick. ONNX is left to test_export.py
    # (same export_model call and onnxruntime session, ~15 s more here).
    formats = ["keras", "tf_saved_model", "litert"]
    results = export.main(["--variant", "mini", "--depths", "1", "1", "1", "1",
                           "--out", str(tmp_path), "--formats", *formats])
    assert set(results) == set(formats)
    for format, result in results.items():
        assert result["bytes"] > 100_000, format
        assert result["max_abs_diff"] <= 1e-5, (format, result)
