"""Class-activation and global-attention maps (`tfgcvit.explain`, `tfgcvit explain`).

Everything uses the tiny fixture checkpoint: its maps show structure, not
semantics, so the tests check properties that hold for any weights - shapes,
normalisation, probabilities, the exact CAM decomposition of GC ViT's head,
and that the class map of a head built to read only one half of the image
lies in that half.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE_CONFIG, FIXTURES, tolerance

REPO = Path(__file__).resolve().parents[1]
CAT = REPO / "examples" / "images" / "cat.jpg"
CUSTOM = ["--model", "custom", "--config", str(FIXTURES / "custom_224_config.json"),
          "--weights", str(FIXTURES / "custom_224.pth.tar")]


def photo(height=224, width=224):
    from tfgcvit.data.images import evaluation_transform, load_image

    image = evaluation_transform(load_image(CAT), max(height, width))
    return image[:height, :width]


def jax_backend():
    import keras

    return keras.backend.backend() == "jax"


@pytest.fixture(scope="module")
def sized_model(fixture_model, fixture_state_dict):
    """The fixture weights at 96 x 136, not a window multiple at any stage: every block pads and crops.

    On JAX, which compiles every new shape for tens of seconds here, the
    224 x 224 fixture model, which the next test compiles for the same batch.
    """
    from tfgcvit import GCViT, load_torch_weights

    if jax_backend():
        return fixture_model
    model = GCViT(**dict(FIXTURE_CONFIG, input_shape=(96, 136, 3)))
    load_torch_weights(model, fixture_state_dict)
    return model


def halves_reading_model(backbone):
    """The fixture backbone with a two-class head: class 0 reads only the left 3 of the 7
    feature columns, class 1 only the right 3.

    Each class score is the sum over channels of the averaged ReLU of the
    features it reads, so it has positive evidence at every position it reads.
    """
    import keras

    features = backbone.get_layer("norm").output  # (B, 7, 7, C) at 224
    scores = []
    for side, crop in (("left", ((0, 0), (0, 4))), ("right", ((0, 0), (4, 0)))):
        x = keras.layers.Cropping2D(crop, name=f"{side}_half")(features)
        x = keras.layers.GlobalAveragePooling2D(name=f"{side}_pool")(keras.layers.ReLU()(x))
        scores.append(keras.layers.Dense(1, kernel_initializer="ones", name=f"{side}_score")(x))
    return keras.Model(backbone.inputs[0], keras.layers.Concatenate()(scores), name="halves_reader")


@pytest.mark.backends
def test_maps_have_the_image_size_are_finite_and_normalised(sized_model, golden):
    from tfgcvit import preprocess_input
    from tfgcvit.explain import explain_images

    size = tuple(sized_model.inputs[0].shape[1:3])
    if size == (224, 224):
        images, reference = golden["pixels"], golden["logits"]
    else:
        images = np.stack([photo(*size), photo(*size)[::-1]])
        reference = np.asarray(sized_model.predict(preprocess_input(images), verbose=0))
    expected_tokens = {(96, 136): [(24, 34), (12, 17), (6, 9), (3, 5)],
                       (224, 224): [(56, 56), (28, 28), (14, 14), (7, 7)]}[size]
    bias = np.asarray(sized_model.get_layer("head").bias)
    for result, logits in zip(explain_images(sized_model, images), reference):
        assert sorted(result["attention"]) == ["stage0", "stage1", "stage2", "stage3"]
        for values in [result["cam"], *result["attention"].values()]:
            assert values.shape == size and values.dtype == np.float32
            assert np.all(np.isfinite(values))
            assert values.min() == 0.0 and values.max() == pytest.approx(1.0)
        # Token maps at the stage resolutions (stride 4, 8, 16, 32, rounded up).
        assert [m.shape for m in result["attention_tokens"].values()] == expected_tokens

        np.testing.assert_allclose(result["logits"], logits, rtol=0, atol=tolerance(logits))
        assert result["class_index"] == int(np.argmax(logits))
        assert result["probabilities"].sum() == pytest.approx(1.0, abs=1e-5)
        # GC ViT's head averages the positions then applies a dense layer: the
        # HiResCAM (= Grad-CAM = CAM) values sum to the logit less the head bias.
        index = result["class_index"]
        assert result["cam_tokens"].sum() == pytest.approx(logits[index] - bias[index], abs=1e-4)


@pytest.mark.backends
def test_global_attention_probabilities_sum_to_one_and_blocks_match_the_official_model(fixture_model, golden):
    from tfgcvit.explain import attention_token_maps, global_attention

    stages = global_attention(fixture_model, golden["inputs"])
    expected_windows, tokens = (64, 16, 1, 1), (49, 49, 196, 49)
    for i, stage in enumerate(stages):
        # One global block (the odd one) per stage of depths (2, 2, 3, 2).
        (probabilities,) = stage["probabilities"]
        heads = FIXTURE_CONFIG["num_heads"][i]
        assert probabilities.shape == (2, heads, expected_windows[i], tokens[i], tokens[i])
        assert np.all(probabilities >= 0)
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=0, atol=1e-5)
        # The blocks run one by one for the attention compute the official stage output.
        reference = golden[f"stage{i}"]
        np.testing.assert_allclose(stage["output"], reference, rtol=0, atol=tolerance(reference))
    # At window multiples, each window's key positions receive one unit of attention.
    for stage, token_map in zip(stages, attention_token_maps(stages)):
        w = stage["window_size"]
        height, width = stage["size"]
        windows = token_map.reshape(2, height // w, w, width // w, w).sum(axis=(2, 4))
        np.testing.assert_allclose(windows, 1.0, rtol=0, atol=1e-5)


@pytest.mark.backends
def test_class_map_of_a_head_reading_one_half_lies_in_that_half(fixture_model):
    from tfgcvit.explain import explain_images

    # The same photo twice, explained for class 0 (left) and class 1 (right) in one batch.
    results = explain_images(halves_reading_model(fixture_model), np.stack([photo(), photo()]), class_index=[0, 1])
    # Each of the 7 feature columns spans 32 pixels; column 3 (read by neither
    # head, so 0) has its centre between pixels 111 and 112: bilinear
    # upsampling leaves pixels 112- of a left map and 0-111 of a right map at 0.
    for result, side in zip(results, ("left", "right")):
        cam = result["cam"]
        assert cam.max() == pytest.approx(1.0)
        _, column = np.unravel_index(np.argmax(cam), cam.shape)
        assert (column < 112) == (side == "left")
        read, unread = (cam[:, :112], cam[:, 112:]) if side == "left" else (cam[:, 112:], cam[:, :112])
        assert unread.max() == 0.0 and read.mean() > 0.1, side


def test_gradcam_equals_hirescam_for_the_gcvit_head(fixture_model):
    from tfgcvit.explain import explain_image

    image = photo()
    hires = explain_image(fixture_model, image, class_index=3)
    grad = explain_image(fixture_model, image, class_index=3, method="gradcam")
    assert hires["class_index"] == grad["class_index"] == 3
    np.testing.assert_allclose(grad["cam_tokens"], hires["cam_tokens"], rtol=0, atol=1e-5)
    # The explaining sub-models are not attached to the model (nor saved with it).
    import keras

    assert not any(isinstance(layer, keras.Model) for layer in fixture_model._flatten_layers(include_self=False))


def test_bad_models_and_images_are_refused_clearly(fixture_model, fixture_state_dict):
    from tfgcvit import GCViT
    from tfgcvit.explain import explain_image

    with pytest.raises(ValueError, match=r"takes 224x224 images; got 96x96.*input_shape=\(None, None, 3\)"):
        explain_image(fixture_model, photo(96, 96))
    with pytest.raises(ValueError, match="class_index must be in 0..9"):
        explain_image(fixture_model, photo(), class_index=10)
    with pytest.raises(ValueError, match="RGB images"):
        explain_image(fixture_model, np.zeros((224, 224), np.uint8))
    # Without a head the output is the feature map, or with pooling (batch, 128) pooled
    # features, which have the shape of class scores: refused, not explained as classes.
    for pooling, shape in ((None, "(None, 7, 7, 128)"), ("avg", "(None, 128)"), ("max", "(None, 128)")):
        headless = GCViT(**dict(FIXTURE_CONFIG, include_top=False, pooling=pooling))
        with pytest.raises(ValueError) as error:
            explain_image(headless, photo())
        message = str(error.value)
        assert "\n" not in message and f"features of shape {shape}" in message, message
        assert ("pooled features" in message) == (pooling is not None)
        assert message.endswith("Pass a classifier: the model built with include_top=True, or this model "
                                "with your own head on top.")


@pytest.mark.backends
def test_a_model_that_normalises_its_input_is_explained_like_the_same_weights_without(
        fixture_model, fixture_state_dict, golden):
    from tfgcvit import GCViT, load_torch_weights, preprocess_input
    from tfgcvit.explain import explain_images, global_attention

    # include_preprocessing=True: the model takes pixels and normalises them itself.
    normalising = GCViT(**dict(FIXTURE_CONFIG, include_preprocessing=True))
    load_torch_weights(normalising, fixture_state_dict)
    pixels = golden["pixels"]
    for ours, reference in zip(explain_images(normalising, pixels), explain_images(fixture_model, pixels)):
        for key in ("logits", "cam_tokens"):
            np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=tolerance(reference[key]))
        assert ours["class_index"] == reference["class_index"]
        maps = [("cam", ours["cam"], reference["cam"])] + [
            (name, ours["attention"][name], values) for name, values in reference["attention"].items()]
        for name, values, expected in maps:
            np.testing.assert_allclose(values, expected, rtol=0, atol=1e-4, err_msg=name)
    # global_attention takes what the model takes: here the pixels.
    reference_stages = global_attention(fixture_model, preprocess_input(pixels))
    for ours, reference in zip(global_attention(normalising, pixels), reference_stages):
        (probabilities,), (expected,) = ours["probabilities"], reference["probabilities"]
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=tolerance(expected))


def test_render_gives_a_png_with_all_panels(fixture_model, tmp_path):
    from tfgcvit.explain import explain_image, render

    image = photo()
    picture = render(image, explain_image(fixture_model, image), [f"class {i}" for i in range(10)])
    picture.save(tmp_path / "cat.png")
    with Image.open(tmp_path / "cat.png") as reopened:
        assert reopened.format == "PNG" and reopened.mode == "RGB"
        width, height = reopened.size
    assert width == 6 * 224 and height > 224


def test_turbo_colour_map_matches_matplotlib(monkeypatch, fixture_model):
    import sys

    from tfgcvit.explain import explain_image, render, turbo

    # matplotlib's colormaps["turbo"] at points between turbo's own 33 (read once
    # from matplotlib; it is not a dependency, see `TURBO`).
    points = [0.0, 0.1, 0.3, 0.55, 0.7, 0.9, 1.0]
    expected = [(0.1900, 0.0718, 0.2322), (0.2697, 0.3488, 0.7963), (0.0975, 0.8371, 0.8034),
                (0.7661, 0.9463, 0.2031), (0.9961, 0.6428, 0.1916), (0.7648, 0.1437, 0.0104),
                (0.4796, 0.0158, 0.0106)]
    np.testing.assert_allclose(turbo(points), expected, atol=6 / 255)
    np.testing.assert_array_equal(turbo([-1.0, 2.0]), turbo([0.0, 1.0]))  # clipped
    assert turbo(np.zeros((4, 5))).shape == (4, 5, 3)

    # Rendering needs no matplotlib (Keras imports it, at 25-60 MiB, whenever installed).
    image = photo()
    result = explain_image(fixture_model, image)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    picture = np.asarray(render(image, result))
    assert picture.shape[1] == 6 * 224 and picture.shape[2] == 3


def _lines(text):
    # TensorFlow's own start-up lines are not the command's.
    return [line for line in text.splitlines() if line.startswith("tfgcvit")]


def test_command_writes_pictures_prints_top5_and_reports_bad_images(tmp_path, capsys):
    from tfgcvit.cli import main

    out = tmp_path / "maps"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a JPEG")
    coffee = REPO / "examples" / "images" / "coffee.jpg"
    code = main(["explain", *CUSTOM, "--out", str(out), str(CAT), str(broken), str(coffee)])
    captured = capsys.readouterr()
    assert code == 1
    errors = _lines(captured.err)
    assert len(errors) == 2 and errors[0].startswith(f"tfgcvit: error: {broken}: ")
    assert errors[1] == "tfgcvit: error: 1 of 3 images could not be read"
    lines = captured.out.splitlines()
    assert lines[0] == str(CAT) and lines[7] == str(coffee)
    assert all(line.startswith(f"  {rank}. ") for rank, line in zip(range(1, 6), lines[1:6]))
    assert lines[6] == f"  -> {out / 'cat_explain.png'} (hirescam of {lines[1].split()[-1]})"
    for name in ("cat_explain.png", "coffee_explain.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.size[0] == 6 * 224


def test_command_json_and_class_choice(tmp_path, capsys):
    from tfgcvit.cli import main

    code = main(["explain", *CUSTOM, "--json", "--class", "7", "--out", str(tmp_path), str(CAT), str(CAT)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["model"] == "custom" and report["size"] == 224
    first, second = report["results"]
    # The same file twice: two pictures, not one overwritten.
    assert [Path(first["output"]).name, Path(second["output"]).name] == ["cat_explain.png", "cat_explain_2.png"]
    assert first["class"] == {"index": 7, "label": "7"} and len(first["predictions"]) == 5
    assert first["cam"]["shape"] == [224, 224] and first["cam"]["max"] == pytest.approx(1.0)
    assert sorted(first["attention"]) == ["stage0", "stage1", "stage2", "stage3"]

    assert main(["explain", *CUSTOM, "--class", "tabby", str(CAT)]) == 1
    assert _lines(capsys.readouterr().err) == [
        "tfgcvit: error: --class 'tabby': no such class label; pass a class index or a label such as '0'"
    ]


def test_command_keeps_existing_pictures_unless_told_to_overwrite(tmp_path, capsys):
    from tfgcvit.cli import main

    mine = tmp_path / "cat_explain.png"
    mine.write_bytes(b"someone's picture")
    # Refused before the model is built: nothing written, the file as it was.
    assert main(["explain", *CUSTOM, "--out", str(tmp_path), str(CAT)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _lines(captured.err) == [
        f"tfgcvit: error: {mine} exists; pass --overwrite to replace it, or choose another --out"]
    assert mine.read_bytes() == b"someone's picture" and sorted(tmp_path.iterdir()) == [mine]

    assert main(["explain", *CUSTOM, "--overwrite", "--out", str(tmp_path), str(CAT)]) == 0
    with Image.open(mine) as picture:
        assert picture.format == "PNG" and picture.size[0] == 6 * 224
    # Written beside it and moved into place: no temporary file is left.
    assert sorted(tmp_path.iterdir()) == [mine]


@pytest.mark.parametrize("text", ["\u00b2", "\u0661", "10"])  # superscript two, Arabic-Indic one, beyond 0..9
def test_command_class_that_is_no_index_is_one_line(text, capsys):
    from tfgcvit.cli import main

    assert main(["explain", *CUSTOM, "--class", text, str(CAT)]) == 1
    captured = capsys.readouterr()
    expected = ("--class 10: the model has 10 classes (0..9)" if text == "10" else
                f"--class {text!r}: no such class label; pass a class index or a label such as '0'")
    assert captured.out == "" and captured.err == f"tfgcvit: error: {expected}\n"
