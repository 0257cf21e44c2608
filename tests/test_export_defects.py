"""Export defects of issue 28 ("Nothing lost, nothing silently wrong"), each on the real thing.

ONNX files taking pixels run on pixels alone and match the official golden outputs;
ONNX export prints no shape-inference guesses; `tfgcvit export` refuses a destination
it cannot or may not write before it builds the model, refuses a dangling link without
--overwrite, and names the user's path when a read-only folder or a full disk (real
tmpfs mounts) stops it; a model built for any size refuses images under 32 pixels
where it sees their size.
"""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import FIXTURE_CONFIG
from test_cli import CUSTOM, softmax
from tfgcvit.cli import main

BACKEND = keras.backend.backend()
only_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow", reason="exports from TensorFlow")


@contextlib.contextmanager
def tmpfs(size, read_only=False):
    """A fresh tmpfs of `size` (e.g. "64k"), read-only if asked (root writes through folder modes)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="tfgcvit-tmpfs-"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                       capture_output=True)
    except subprocess.CalledProcessError as error:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {error.stderr.decode().strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


@pytest.fixture
def never_built(monkeypatch):
    """Makes building the model fail the test: what is refused must be refused before."""
    import tfgcvit.cli

    def resolve(args):
        raise AssertionError("the model was resolved and built before the destination was checked")

    monkeypatch.setattr(tfgcvit.cli, "_resolve_model", resolve)


def error_line(capsys):
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# ---------------------------------------------------------------------------
# ONNX with --include-preprocessing: pixels alone, the golden outputs.


@only_tensorflow
@pytest.mark.parametrize("options", [[], ["--size", "224"], ["--int8"]], ids=["any_size", "224", "int8"])
def test_onnx_with_preprocessing_runs_on_pixels_alone(options, golden, capsys, caplog, tmp_path):
    """Keras' Normalization kept its constants as eager tensors, which tf2onnx wrote as two
    more required inputs ("Required inputs ... Sub/y:0, Sqrt/x:0 are missing")."""
    onnxruntime = pytest.importorskip("onnxruntime")
    output = tmp_path / "gcvit.onnx"
    assert main(["export", str(output), "--include-preprocessing", "--json", *options, *CUSTOM]) == 0
    assert json.loads(capsys.readouterr().out)["include_preprocessing"]
    # ONNX Runtime's symbolic shape inference (optimize_onnx) logged one guess per level
    # and axis of a file of any size ("Unable to determine if floor(...) <= ..., treat as equal").
    assert [r.getMessage() for r in caplog.records if "Unable to determine" in r.getMessage()] == []
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    if "--size" in options:
        assert feed.shape[1:] == [224, 224, 3]
    else:
        assert all(isinstance(size, str) for size in feed.shape[1:3]) and feed.shape[3] == 3
    (probabilities,) = session.run(None, {feed.name: golden["pixels"].astype(np.float32)})
    expected = softmax(golden["logits"])
    if "--int8" in options:  # the dense layers in int8: top-1 kept, probabilities close
        np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
        assert np.abs(probabilities - expected).max() < 0.05
    else:
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)


@only_tensorflow
def test_onnx_export_refuses_a_file_that_would_need_more_than_the_images(tmp_path):
    """A user's layer with tensor constants (Keras' Normalization) would make such a file."""
    pytest.importorskip("tf2onnx")
    from tfgcvit.export import export_model

    images = keras.Input((None, None, 3))
    normalisation = keras.layers.Normalization(mean=[120.0, 115.0, 100.0], variance=[3600.0, 3500.0, 3700.0])
    normalised = normalisation(images)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(normalised))
    model = keras.Model(images, pooled, name="user_model")
    path = tmp_path / "user.onnx"
    with pytest.raises(ValueError, match=r"would need the inputs \[.*Sub.*\] besides the images.*Rescaling"):
        export_model(model, path, format="onnx")
    assert not path.exists()  # no file that cannot run


# ---------------------------------------------------------------------------
# The destination, checked before the model is built.


@pytest.mark.parametrize("name, message", [
    ("", "OUTPUT is empty; name the file *.onnx (ONNX) or *.tflite (TFLite), or a folder for a TensorFlow "
         "SavedModel"),
    ("folder.onnx", "{path} is a folder; give a file name"),
    ("missing/gcvit.onnx", "{tmp}/missing: no such folder"),
    ("gcvit.pt", "{path}: name the file *.onnx (ONNX) or *.tflite (TFLite), or give a name without a suffix "
                 "for a TensorFlow SavedModel folder; the name chooses the format"),
])
def test_export_refuses_a_bad_destination_before_building_the_model(name, message, never_built, capsys,
                                                                      tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.onnx").mkdir()
    path = str(tmp_path / name) if name else ""
    assert main(["export", path, *CUSTOM]) == 1
    assert error_line(capsys) == f"tfgcvit: error: {message.format(path=path, tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx"]


@pytest.mark.parametrize("name", ["gcvit.onnx", "gcvit.tflite", "gcvit"])
def test_export_to_a_read_only_folder_is_refused_before_building_the_model(name, never_built, capsys):
    with tmpfs("64k", read_only=True) as folder:
        output = folder / name
        assert main(["export", str(output), *CUSTOM]) == 1
        assert error_line(capsys) == f"tfgcvit: error: cannot write {output}: Read-only file system\n"


def test_a_dangling_link_is_refused_without_overwrite(never_built, capsys, tmp_path):
    link = tmp_path / "gcvit.onnx"
    link.symlink_to(tmp_path / "elsewhere.onnx")
    assert main(["export", str(link), *CUSTOM]) == 1
    assert error_line(capsys) == f"tfgcvit: error: {link} exists; pass --overwrite to replace it\n"
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "elsewhere.onnx")
    saved_model = tmp_path / "gcvit"
    saved_model.symlink_to(tmp_path / "elsewhere")
    assert main(["export", str(saved_model), "--overwrite", *CUSTOM]) == 1
    assert error_line(capsys) == (f"tfgcvit: error: {saved_model} exists and is not a SavedModel folder; "
                                  "choose another name\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gcvit", "gcvit.onnx"]


@only_tensorflow
def test_a_dangling_link_is_replaced_with_overwrite(capsys, monkeypatch, tmp_path):
    import tfgcvit.export

    def export_model(model, path, format):
        Path(path).write_bytes(b"the export")

    monkeypatch.setattr(tfgcvit.export, "export_model", export_model)
    link = tmp_path / "gcvit.onnx"
    link.symlink_to(tmp_path / "elsewhere.onnx")
    assert main(["export", str(link), "--overwrite", *CUSTOM]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {link} (onnx, ")
    assert not link.is_symlink() and link.read_bytes() == b"the export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gcvit.onnx"]  # the link's target was not made


# ---------------------------------------------------------------------------
# A full disk: one line naming the user's path, nothing left behind.


@only_tensorflow
@pytest.mark.parametrize("name", ["gcvit.onnx", "gcvit"])
def test_a_full_disk_is_one_line_naming_the_users_path(name, capsys):
    """ONNX raises OSError without a path; TensorFlow's SavedModel writer its own error naming the
    hidden temporary folder (".gcvit.1a2b3c4d.savedmodel/variables/...")."""
    if name.endswith(".onnx"):
        pytest.importorskip("tf2onnx")
    with tmpfs("256k") as folder:
        output = folder / name
        assert main(["export", str(output), *CUSTOM]) == 1
        assert error_line(capsys) == f"tfgcvit: error: cannot write {output}: No space left on device\n"
        assert list(folder.iterdir()) == []  # the temporary file or folder is gone


# ---------------------------------------------------------------------------
# Images under 32 pixels, for a model built for any size.


@pytest.mark.backends
def test_a_model_for_any_size_refuses_images_under_32_pixels_as_a_fixed_size_does():
    from tfgcvit import GCViT

    config = dict(FIXTURE_CONFIG, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="Input height 1 is below the minimum of 32 pixels"):
        GCViT(**config, input_shape=(1, 64, 3))
    model = GCViT(**config, input_shape=(None, None, 3))
    assert model(np.zeros((1, 32, 33, 3), "float32")).shape == (1, config["classes"])
    for shape, name in (((1, 1, 1, 3), "height 1"), ((2, 64, 31, 3), "width 31")):
        with pytest.raises(ValueError, match=f"Input {name} is below the minimum of 32 pixels"):
            model(np.zeros(shape, "float32"))
    # predict traces a function for the batches' size (last: on JAX a failed trace leaves
    # the model unusable, a Keras bug that any error inside predict shows).
    with pytest.raises(ValueError, match="Input height 16 is below the minimum of 32 pixels"):
        model.predict(np.zeros((2, 16, 40, 3), "float32"), verbose=0)
