"""keras-hub's own detection and segmentation task models on a tiny GCViTBackbone.

`RetinaNetObjectDetector` on `RetinaNetBackbone(image_encoder=GCViTBackbone)` and
`DeepLabV3ImageSegmenter` on `DeepLabV3Backbone(image_encoder=GCViTBackbone)`:
`fit`, `predict` at sizes whose stage maps are not window multiples, and the
`.keras` round trip. One model of each is built and trained per module.

Both task models need image sides that are multiples of 32: RetinaNet's
feature pyramid upsamples each level by exactly 2 before adding it to the one
below, DeepLabV3+ upsamples P5 8x to concatenate it with P2 and the result 4x
to the image. 160x192 gives stage maps 40x48, 20x24, 10x12 and 5x6, none a
multiple of the windows (7, 7, 14, 7): every stage pads.
"""

import keras
import keras_hub
import numpy as np
import pytest

from tfgcvit.hub import GCViTBackbone

# GC ViT's global attention is in every second block: stage 2 (10x12 at 160x192, window
# 14) has one, which pads and resizes its global query; one block elsewhere keeps the
# JAX compilation time down.
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(7, 7, 14, 7),
            drop_path_rate=0.0)
NUM_CLASSES = 2
TRAIN_SIZE = (128, 128)
ODD_SIZE = (160, 192)  # multiples of 32, not of the windows at any stage
STEPS = 6
# TensorFlow runs six eager steps in ~10 s but traces its training graph for ~100 s
# (the examples' measured runs train compiled); JAX is the other way round (XLA
# compiles once, its op-by-op eager steps take minutes); PyTorch is eager anyway.
EAGER = keras.backend.backend() != "jax"


def tiny_batch(height, width, seed=0):
    """Two noise images with one bright and one dark rectangle each: boxes, classes and masks."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.5, (2, height, width, 3)).astype("float32")
    boxes = np.array([[[8, 8, 56, 64], [64, 72, 120, 120]],
                      [[16, 60, 80, 120], [70, 10, 118, 50]]], "float32")
    labels = np.array([[0, 1], [1, 0]], "int32")
    masks = np.zeros((2, height, width), "int32")
    for i in range(2):
        for (top, left, bottom, right), label in zip(boxes[i].astype(int), labels[i]):
            images[i, top:bottom, left:right] = 2.0 if label == 0 else -2.0
            masks[i, top:bottom, left:right] = label + 1
    return images, boxes, labels, masks


def numpy_tree(outputs):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


@pytest.fixture(scope="module")
def detector():
    """A RetinaNet on the tiny GC ViT, trained STEPS steps on one fixed batch; (model, history)."""
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=GCViTBackbone(**TINY), min_level=3, max_level=7, use_p5=False)
    model = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=NUM_CLASSES, bounding_box_format="yxyx", pre_logits_num_conv_layers=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=EAGER)
    images, boxes, labels, _ = tiny_batch(*TRAIN_SIZE)
    history = model.fit(images, {"boxes": boxes, "labels": labels}, batch_size=2, epochs=STEPS, verbose=0)
    return model, history


@pytest.fixture(scope="module")
def segmenter():
    """A DeepLabV3+ on the tiny GC ViT, trained STEPS steps on one fixed batch; (model, history)."""
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=GCViTBackbone(**TINY), spatial_pyramid_pooling_key="P5", upsampling_size=8,
        dilation_rates=[1, 2], low_level_feature_key="P2", projection_filters=16)
    model = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=NUM_CLASSES + 1)
    # Class-index masks: keras-hub's default loss and metric expect one-hot masks, and
    # metrics=None would keep the default metric of the task's own compile().
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy()], run_eagerly=EAGER)
    images, _, _, masks = tiny_batch(*TRAIN_SIZE)
    history = model.fit(images, masks, batch_size=2, epochs=STEPS, verbose=0)
    return model, history


@pytest.mark.backends
def test_retinanet_fit_loss_falls(detector):
    _, history = detector
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.backends
def test_retinanet_predict_at_non_window_size(detector):
    model, _ = detector
    images, *_ = tiny_batch(*ODD_SIZE, seed=1)
    raw = numpy_tree(model(images))
    # 9 anchors per position of P3..P7, each level ceil(side / 2**level).
    positions = sum(-(-ODD_SIZE[0] // 2**level) * -(-ODD_SIZE[1] // 2**level) for level in range(3, 8))
    assert raw["bbox_regression"].shape == (2, 9 * positions, 4)
    assert raw["cls_logits"].shape == (2, 9 * positions, NUM_CLASSES)
    detections = model.predict(images, verbose=0)  # decoded with the anchors + non-max suppression
    assert detections["boxes"].shape == (2, 100, 4) and detections["confidence"].shape == (2, 100)
    assert np.all(np.isfinite(detections["boxes"])) and np.all(detections["num_detections"] <= 100)


def _keras_round_trip(model, tmp_path, task_class):
    """Saves a task model to .keras and loads it; returns (original, restored) raw outputs."""
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, task_class)
    assert isinstance(restored.backbone.image_encoder, GCViTBackbone)
    images, *_ = tiny_batch(*ODD_SIZE, seed=2)
    return numpy_tree(model(images)), numpy_tree(restored(images))


@pytest.mark.backends
def test_retinanet_keras_round_trip(detector, tmp_path):
    expected, actual = _keras_round_trip(detector[0], tmp_path, keras_hub.models.RetinaNetObjectDetector)
    for name in ("bbox_regression", "cls_logits"):  # the head outputs, before box decoding
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.mark.backends
def test_deeplab_fit(segmenter):
    _, history = segmenter
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.backends
def test_deeplab_predict_at_non_window_size(segmenter):
    model, _ = segmenter
    images, *_ = tiny_batch(*ODD_SIZE, seed=1)
    logits = model.predict(images, verbose=0)
    assert logits.shape == (2, *ODD_SIZE, NUM_CLASSES + 1) and np.all(np.isfinite(logits))


@pytest.mark.backends
def test_deeplab_keras_round_trip(segmenter, tmp_path):
    expected, actual = _keras_round_trip(segmenter[0], tmp_path, keras_hub.models.DeepLabV3ImageSegmenter)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.backends
def test_sides_not_multiple_of_32_are_refused(detector, segmenter):
    """keras-hub's fixed 2x/8x/4x upsampling cannot meet the 97x131 stage maps (25x33 ... 4x5)."""
    images, *_ = tiny_batch(97, 131)
    for model, _ in (detector, segmenter):
        with pytest.raises(Exception):
            model(images)
