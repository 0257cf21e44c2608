"""Converting PyTorch checkpoints to Keras .weights.h5 files: detection, conversion, CLI entry points."""

import argparse
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import tfgcvit
from tfgcvit import convert
from tfgcvit.convert import UnknownVariantError, detect_variant
from tfgcvit.weights.mapping import keras_weight_table, torch_to_keras_array
from weights_helpers import (
    CHECKPOINT_FIXTURE,
    FileServer,
    official_shapes,
    random_state_dict,
    save_training_checkpoint,
)

# Reference names of the official registrations -> tfgcvit variant names.
REFERENCE_VARIANTS = {
    "xxtiny": "xxtiny", "xtiny": "xtiny", "tiny": "tiny", "tiny2": "tiny2", "small": "small",
    "small2": "small2", "base": "base", "large": "large", "large_224_21k": "large",
    "large_384_21k": "large_384", "large_512_21k": "large_512",
}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFGCVIT_MIRROR", raising=False)


@pytest.mark.parametrize("reference_name", list(REFERENCE_VARIANTS))
def test_detects_every_official_variant(reference_name):
    # Shapes are all detection looks at: zero-cost broadcast arrays stand in for weights.
    state = {name: np.broadcast_to(np.float32(0), shape) for name, shape in official_shapes(reference_name).items()}
    variant, config = detect_variant(state)
    assert variant == REFERENCE_VARIANTS[reference_name]
    assert config["classes"] == 1000


def test_detects_timm_layout():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    # timm (torchvision) in a separate process: importing it after TensorFlow can crash.
    result = subprocess.run(
        [sys.executable, "-c",
         "import json, timm\n"
         "model = timm.create_model('gcvit_xxtiny')\n"
         "print(json.dumps({n: list(t.shape) for n, t in model.state_dict().items()}))"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    state = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    assert any(name.startswith("stages.") for name in state)
    variant, config = detect_variant(state)
    assert variant == "xxtiny" and config["window_size"] == (7, 7, 14, 7)


def test_custom_checkpoint_matches_no_variant(tmp_path):
    destination = tmp_path / "custom.weights.h5"
    with pytest.raises(UnknownVariantError) as error:
        convert.convert(CHECKPOINT_FIXTURE, destination)
    message = str(error.value)
    for detected in ("embed_dim=16", "depths=(2, 2, 3, 2)", "num_heads=(1, 2, 4, 8)",
                     "window_size=(7, 7, 14, 7)", "mlp_ratio=3", "layer_scale=yes", "classes=10"):
        assert detected in message
    assert "tfgcvit.GCViT(" in message
    assert not destination.exists()


def test_destination_must_be_a_keras_weights_file(tmp_path):
    with pytest.raises(ValueError, match=r"must end in '\.weights\.h5'.*model\.weights\.h5"):
        convert.convert(tmp_path / "not-read.pth", tmp_path / "model.h5")


def test_not_a_gc_vit_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, path)
    with pytest.raises(UnknownVariantError, match="not a GC ViT state dict.*conv1.weight"):
        convert.convert(path, tmp_path / "x.weights.h5")


@pytest.fixture(scope="module")
def xxtiny_training_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    state = random_state_dict(official_shapes("xxtiny"), seed=5)
    ema = random_state_dict(official_shapes("xxtiny"), seed=6)
    path = save_training_checkpoint(tmp_path_factory.mktemp("ckpt") / "xxtiny.pth.tar", state, ema, optimizer=False)
    return path, state, ema


def _assert_model_has(model, state):
    for name, variable, layout in keras_weight_table(model):
        np.testing.assert_array_equal(np.asarray(variable), torch_to_keras_array(state[name], layout), err_msg=name)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="tfgcvit convert")
    convert.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_converts_state_dict_and_ema(xxtiny_training_checkpoint, tmp_path, capsys):
    source, state, ema = xxtiny_training_checkpoint
    destination = tmp_path / "out" / "xxtiny.weights.h5"
    assert convert.main(_parse([str(source), str(destination)])) == 0
    assert capsys.readouterr().out.strip() == (
        f"Converted {source} (state_dict, GC ViT xxtiny, 1000 classes) -> {destination}")
    model = tfgcvit.GCViTXXTiny(weights=str(destination))
    _assert_model_has(model, state)
    assert not [p.name for p in destination.parent.iterdir() if p.name != destination.name]  # no temporaries

    # --ema, from a URL this time (the download path of convert).
    with FileServer({"/ckpt/xxtiny.pth.tar": source.read_bytes()}) as server:
        ema_destination = tmp_path / "xxtiny_ema.weights.h5"
        args = _parse([server.url("/ckpt/xxtiny.pth.tar"), str(ema_destination), "--ema", "--variant", "xxtiny"])
        assert convert.main(args) == 0
    assert "(state_dict_ema, GC ViT xxtiny, 1000 classes)" in capsys.readouterr().out
    model.load_weights(str(ema_destination))
    _assert_model_has(model, ema)


def test_cli_reports_errors_in_one_line(xxtiny_training_checkpoint, tmp_path, capsys):
    source, _, _ = xxtiny_training_checkpoint
    cases = [
        ([str(tmp_path / "missing.pth"), str(tmp_path / "a.weights.h5")], "does not exist"),
        ([str(CHECKPOINT_FIXTURE), str(tmp_path / "b.weights.h5"), "--variant", "nope"], "Unknown GC ViT variant"),
        ([str(source), str(tmp_path / "c.weights.h5"), "--variant", "xtiny"], "does not fit model"),
        ([str(CHECKPOINT_FIXTURE), str(tmp_path / "d.weights.h5")], "matches no official GC ViT variant"),
    ]
    for argv, message in cases:
        assert convert.main(_parse(argv)) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tfgcvit convert: error: ") and message in lines[0]
    assert not list(tmp_path.glob("*.h5"))
