"""GC ViT in keras-hub: parity with the official code, presets, backbone behaviour, bad input."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, REPO, tolerance

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

import tfgcvit  # noqa: E402
from tfgcvit import hub  # noqa: E402
from tfgcvit.weights import pretrained  # noqa: E402
from tfgcvit.convert import convert_to_preset  # noqa: E402
from tfgcvit.weights.mapping import keras_weight_table, torch_to_keras_array  # noqa: E402

FIXTURE_ARCHITECTURE = dict(embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
                            window_size=(7, 7, 14, 7), mlp_ratio=3.0, layer_scale=1e-5)
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=(7, 7, 14, 7),
            mlp_ratio=2.0)
CHECKPOINT = FIXTURES / "custom_224.pth.tar"


@pytest.fixture(scope="module")
def fixture_preset(tmp_path_factory):
    """`tfgcvit convert <fixture> --preset DIR`, in this process."""
    directory = tmp_path_factory.mktemp("preset") / "gcvit_fixture"
    result = convert_to_preset(CHECKPOINT, directory)
    assert result["variant"] is None and result["classes"] == 10
    return directory


def _pyramid_model(backbone):
    return keras.Model(backbone.input, backbone.pyramid_outputs)


# Parity with the official code ------------------------------------------------------


@pytest.mark.backends
def test_backbone_pyramid_matches_official_stages(fixture_state_dict, golden):
    backbone = tfgcvit.GCViTBackbone(**FIXTURE_ARCHITECTURE)
    tfgcvit.load_torch_weights(backbone, fixture_state_dict)
    outputs = _pyramid_model(backbone).predict(golden["inputs"], verbose=0)
    assert sorted(outputs) == ["P2", "P3", "P4", "P5"]
    for level, stage in zip(("P2", "P3", "P4", "P5"), ("stage0", "stage1", "stage2", "stage3")):
        np.testing.assert_allclose(outputs[level], golden[stage], rtol=0, atol=tolerance(golden[stage]),
                                   err_msg=level)
    norm = backbone.predict(golden["inputs"], verbose=0)
    np.testing.assert_allclose(norm, golden["norm"], rtol=0, atol=tolerance(golden["norm"]))


@pytest.mark.backends
def test_classifier_matches_official_logits(fixture_state_dict, golden):
    classifier = hub.build_classifier(FIXTURE_ARCHITECTURE, 10, 224, state_dict=fixture_state_dict)
    assert isinstance(classifier, keras_hub.models.ImageClassifier)
    logits = keras.ops.convert_to_numpy(classifier(golden["inputs"]))
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=tolerance(golden["logits"]))


@pytest.mark.backends
def test_preset_round_trip_through_keras_hub_generic_classes(fixture_preset, golden):
    classifier = keras_hub.models.ImageClassifier.from_preset(str(fixture_preset))
    assert type(classifier) is tfgcvit.GCViTImageClassifier
    assert type(classifier.preprocessor.image_converter) is tfgcvit.GCViTImageConverter
    np.testing.assert_allclose(keras.ops.convert_to_numpy(classifier(golden["inputs"])), golden["logits"], rtol=0,
                               atol=tolerance(golden["logits"]))
    # Its own preprocessor on the uint8 pixels: resize (a no-op at 224) and ImageNet mean/std.
    np.testing.assert_allclose(classifier.predict(golden["pixels"], verbose=0), golden["logits"], rtol=0,
                               atol=tolerance(golden["logits"]))
    backbone = keras_hub.models.Backbone.from_preset(str(fixture_preset))
    assert type(backbone) is tfgcvit.GCViTBackbone
    np.testing.assert_allclose(backbone.predict(golden["inputs"], verbose=0), golden["norm"], rtol=0,
                               atol=tolerance(golden["norm"]))


def test_convert_command_writes_presets_keras_hub_accepts(tmp_path, golden):
    classifier_dir, backbone_dir = tmp_path / "classifier", tmp_path / "backbone"
    for argv in ([str(CHECKPOINT), "--preset", str(classifier_dir)],
                 [str(CHECKPOINT), "--preset", str(backbone_dir), "--task", "backbone"]):
        run = subprocess.run([sys.executable, "-m", "tfgcvit", "convert", *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "preset" in run.stdout
    assert {"config.json", "metadata.json", "model.weights.h5", "task.json", "preprocessor.json"} \
        <= set(os.listdir(classifier_dir))
    assert sorted(os.listdir(backbone_dir)) == ["config.json", "metadata.json", "model.weights.h5"]
    # What keras_hub.upload_preset checks before it uploads anything.
    from keras_hub.src.utils.preset_utils import _validate_backbone

    _validate_backbone(str(classifier_dir))
    _validate_backbone(str(backbone_dir))
    with pytest.raises(ValueError, match="Unknown URI"):
        keras_hub.upload_preset("nowhere://x", str(backbone_dir))
    backbone = tfgcvit.GCViTBackbone.from_preset(str(backbone_dir))
    np.testing.assert_allclose(backbone.predict(golden["inputs"], verbose=0), golden["norm"], rtol=0,
                               atol=tolerance(golden["norm"]))


# Named presets, served by a local server ------------------------------------------


def test_presets_list_every_official_checkpoint():
    names = {hub.preset_name(r["variant"], r["pretrain"]) for r in pretrained.official_checkpoints()}
    assert len(names) == 11 and names == set(tfgcvit.GCViTBackbone.presets)
    assert names <= set(keras_hub.models.ImageClassifier.presets)
    assert {"gcvit_tiny_imagenet", "gcvit_large_384_imagenet21k", "gcvit_large_imagenet21k"} <= names
    metadata = tfgcvit.GCViTBackbone.presets["gcvit_tiny_imagenet"]["metadata"]
    assert metadata["params"] == tfgcvit.GCViTTiny(weights=None, include_top=False).count_params()
    assert metadata["license"] == "CC-BY-NC-SA-4.0" and "ImageNet" in metadata["description"]


@pytest.fixture(scope="module")
def xxtiny_checkpoint(tmp_path_factory):
    from weights_helpers import official_shapes, random_state_dict, save_training_checkpoint

    pytest.importorskip("torch")
    state = random_state_dict(official_shapes("xxtiny"), seed=5)
    path = save_training_checkpoint(tmp_path_factory.mktemp("xxtiny") / "gcvit_1k_xxtiny.pth.tar", state)
    data = path.read_bytes()
    return dict(path=path, data=data, sha256=hashlib.sha256(data).hexdigest(), state=state)


def _point_registry_at(monkeypatch, url, sha256):
    records = pretrained.official_checkpoints()
    for record in records:
        if (record["variant"], record["pretrain"]) == ("xxtiny", "imagenet"):
            record.update(url=url, sha256=sha256)
    monkeypatch.setattr(pretrained, "official_checkpoints", lambda: [dict(r) for r in records])


def _assert_weights_are(model, state):
    for name, variable, layout in keras_weight_table(model):
        np.testing.assert_array_equal(np.asarray(variable), torch_to_keras_array(state[name], layout),
                                      err_msg=name)


def test_named_preset_is_fetched_converted_and_cached_once(xxtiny_checkpoint, tmp_path, monkeypatch):
    from weights_helpers import FileServer

    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFGCVIT_MIRROR", raising=False)
    path = "/nvidia/GCViT/resolve/main/gcvit_1k_xxtiny.pth.tar"
    with FileServer({path: xxtiny_checkpoint["data"]}) as server:
        _point_registry_at(monkeypatch, server.url(path), xxtiny_checkpoint["sha256"])
        classifier = keras_hub.models.ImageClassifier.from_preset("gcvit_xxtiny_imagenet")
        assert type(classifier) is tfgcvit.GCViTImageClassifier
        _assert_weights_are(classifier, xxtiny_checkpoint["state"])
        backbone = tfgcvit.GCViTBackbone.from_preset("gcvit_xxtiny_imagenet")
        again = tfgcvit.GCViTImageClassifier.from_preset("gcvit_xxtiny_imagenet")
        assert server.requests == [path]  # one download, one conversion
    _assert_weights_are(backbone, xxtiny_checkpoint["state"])
    np.testing.assert_array_equal(again.output_dense.kernel, classifier.output_dense.kernel)
    assert os.path.isfile(tmp_path / "home" / "presets" / "gcvit_xxtiny_imagenet" / "model.weights.h5")
    assert classifier.preprocessor.image_converter.image_size == (224, 224)


def test_named_preset_from_a_mirror_directory(xxtiny_checkpoint, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(xxtiny_checkpoint["path"], mirror / "gcvit_1k_xxtiny.pth.tar")
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFGCVIT_MIRROR", str(mirror))
    _point_registry_at(monkeypatch, "https://unreachable.invalid/gcvit_1k_xxtiny.pth.tar",
                       xxtiny_checkpoint["sha256"])
    backbone = keras_hub.models.Backbone.from_preset("gcvit_xxtiny_imagenet")
    _assert_weights_are(backbone, xxtiny_checkpoint["state"])


def test_unreachable_preset_fails_clearly_and_leaves_no_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFGCVIT_MIRROR", raising=False)
    _point_registry_at(monkeypatch, "http://127.0.0.1:9/gcvit_1k_xxtiny.pth.tar", None)
    with pytest.raises(OSError, match="Could not download .*pass its path"):
        tfgcvit.GCViTBackbone.from_preset("gcvit_xxtiny_imagenet")
    assert not os.path.exists(tmp_path / "home" / "presets" / "gcvit_xxtiny_imagenet")


# The backbone as keras-hub expects it -------------------------------------------------


@pytest.mark.backends
@pytest.mark.parametrize("size", [(224, 224), (97, 131), (32, 64)])
def test_backbone_pyramid_shapes_at_any_size(size):
    backbone = tfgcvit.GCViTBackbone(**TINY)
    height, width = size
    outputs = _pyramid_model(backbone)(np.random.default_rng(0).normal(size=(2, height, width, 3)))
    half = lambda n: (n - 1) // 2 + 1
    h, w = half(half(height)), half(half(width))
    for level, channels in zip(("P2", "P3", "P4", "P5"), (16, 32, 64, 128)):
        assert tuple(outputs[level].shape) == (2, h, w, channels), level
        h, w = half(h), half(w)
    symbolic = backbone.compute_output_shape((None, height, width, 3))
    assert tuple(symbolic) == (None, *outputs["P5"].shape[1:3], 128)


@pytest.mark.backends
def test_backbone_config_and_keras_file_round_trips_keep_outputs(tmp_path):
    backbone = tfgcvit.GCViTBackbone(**TINY, layer_scale=1e-5, drop_path_rate=0.1, name="gcvit_backbone")
    images = np.random.default_rng(1).normal(size=(1, 64, 96, 3)).astype("float32")
    expected = backbone.predict(images, verbose=0)
    # from_config + the same weights: a key missing from get_config changes the output or fails.
    clone = tfgcvit.GCViTBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(clone.predict(images, verbose=0), expected)
    assert clone.get_config() == backbone.get_config()
    path = tmp_path / "backbone.keras"
    backbone.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is tfgcvit.GCViTBackbone
    np.testing.assert_array_equal(restored.predict(images, verbose=0), expected)
    assert sorted(restored.pyramid_outputs) == ["P2", "P3", "P4", "P5"]


@pytest.mark.backends
def test_backbone_mixed_precision_by_its_dtype_argument():
    backbone = tfgcvit.GCViTBackbone(**TINY, dtype="mixed_bfloat16")
    outputs = _pyramid_model(backbone)(np.zeros((1, 64, 64, 3), "float32"))
    assert all(keras.backend.standardize_dtype(x.dtype) == "bfloat16" for x in outputs.values())
    assert {keras.backend.standardize_dtype(w.dtype) for w in backbone.weights} == {"float32"}
    layers = [layer for layer in backbone._flatten_layers() if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.dtype_policy.name for layer in layers} == {"mixed_bfloat16"}


@pytest.mark.backends
def test_classifier_trains_every_weight_in_one_step():
    classifier = hub.build_classifier(TINY, 3, 64)
    classifier.compile(optimizer=keras.optimizers.SGD(0.1),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in classifier.trainable_weights]
    images = np.random.default_rng(2).integers(0, 256, size=(4, 80, 72, 3)).astype("uint8")
    history = classifier.fit(images, np.array([0, 1, 2, 0]), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    unchanged = [w.path for w, old in zip(classifier.trainable_weights, before) if np.array_equal(w, old)]
    assert unchanged == []


# Bad input -------------------------------------------------------------------------


def test_unknown_preset_lists_the_valid_names():
    for cls in (tfgcvit.GCViTBackbone, tfgcvit.GCViTImageClassifier):
        with pytest.raises(ValueError, match="Unknown GC ViT preset 'gcvit_tinyy_imagenet'.*gcvit_tiny_imagenet"):
            cls.from_preset("gcvit_tinyy_imagenet")


@pytest.mark.parametrize("damage", ["missing weights", "corrupt weights", "corrupt config", "corrupt task"])
def test_broken_preset_directory_names_the_file(fixture_preset, tmp_path, damage):
    directory = tmp_path / "broken"
    shutil.copytree(fixture_preset, directory)
    name = {"missing weights": "model.weights.h5", "corrupt weights": "model.weights.h5",
            "corrupt config": "config.json", "corrupt task": "task.json"}[damage]
    if damage == "missing weights":
        os.remove(directory / name)
    else:
        (directory / name).write_bytes(b"{ not what it should be")
    for cls in (tfgcvit.GCViTImageClassifier, tfgcvit.GCViTBackbone):
        if cls is tfgcvit.GCViTBackbone and name == "task.json":
            continue
        with pytest.raises((OSError, ValueError), match=name.replace(".", r"\.")):
            cls.from_preset(str(directory))
    # The intact preset it was copied from still loads.
    assert type(keras_hub.models.Backbone.from_preset(str(fixture_preset))) is tfgcvit.GCViTBackbone


def test_pretrained_weights_need_three_channels(fixture_preset):
    with pytest.raises(ValueError, match="3 channels"):
        tfgcvit.GCViTBackbone.from_preset(str(fixture_preset), image_shape=(None, None, 1))
    with pytest.raises(ValueError, match="3 channels"):
        keras_hub.models.Backbone.from_preset(str(fixture_preset), image_shape=(None, None, 4))
    # Random weights for other channel counts are fine.
    backbone = tfgcvit.GCViTBackbone.from_preset(str(fixture_preset), image_shape=(None, None, 1),
                                                 load_weights=False)
    assert backbone.input.shape[-1] == 1


def test_without_keras_hub_the_applications_work_and_the_hub_names_say_what_to_install():
    code = (
        "import sys; sys.modules['keras_hub'] = None\n"
        "import tfgcvit\n"
        "model = tfgcvit.GCViTXXTiny(weights=None, input_shape=(64, 64, 3))\n"
        "try:\n"
        "    tfgcvit.GCViTBackbone\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'pip install "tfgcvit[hub]"' in run.stdout
