"""The README's Python examples run, and its variants table matches the package.

Each ```python block of README.md is executed as it stands, with three
substitutions so that it runs offline and quickly:

- every variant constructor (`GCViTTiny`, ...) builds the small fixture
  architecture instead (tests/data/fixtures/custom_224_config.json). Where the
  example would load official weights, the fixture checkpoint's weights are
  loaded; a head of another size than the fixture's 10 classes gets random
  weights. The examples' calls, arguments and data flow are unchanged;
- `model.compile(...)` and `model.fit(...)`, the placeholders of the original
  port's examples, become a real compile and one epoch of fit on four random
  images with labels that fit the model's output;
- `tensorflow_datasets` is a stand-in whose `load()` returns four sample photos
  as ImageNet-v2 would: a dataset of {"image": uint8 (H, W, 3), "label": int64};
- every named keras-hub preset (`gcvit_tiny_imagenet`, ...) is the fixture
  checkpoint converted by `tfgcvit convert --preset`.
"""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE_CONFIG

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
PLACEHOLDER = re.compile(r"^(\s*)(\w+)\.(compile|fit)\(\.\.\.\)\s*$", flags=re.M)
FIXTURE_ARCHITECTURE = {key: value for key, value in FIXTURE_CONFIG.items()
                        if key not in ("classes", "classifier_activation")}


def _block_id(block):
    first = next(line for line in block.splitlines() if line.strip() and not line.startswith("import"))
    return re.sub(r"\W+", "_", first)[:40]


@pytest.fixture
def fixture_constructor(fixture_state_dict):
    from tfgcvit import GCViT, load_torch_weights

    def constructor(include_top=True, weights="imagenet", input_tensor=None, input_shape=None, pooling=None,
                    classes=1000, classifier_activation="softmax", **kwargs):
        if weights not in (None, "imagenet", "imagenet21k"):
            raise AssertionError(f"README examples should not need weights files; got {weights!r}")
        model = GCViT(**FIXTURE_ARCHITECTURE, include_top=include_top, input_tensor=input_tensor,
                      input_shape=input_shape, pooling=pooling, classes=classes,
                      classifier_activation=classifier_activation, **kwargs)
        if weights is not None:
            state = dict(fixture_state_dict)
            if include_top and classes != state["head.weight"].shape[0]:
                rng = np.random.default_rng(0)
                state["head.weight"] = rng.normal(0, 0.02, (classes, state["head.weight"].shape[1]))
                state["head.bias"] = np.zeros(classes)
            load_torch_weights(model, state)
        return model

    return constructor


def _compile(model):
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")


def _fit(model):
    rng = np.random.default_rng(0)
    shape = (4, *model.input_shape[1:])
    images = rng.integers(0, 256, shape).astype(model.inputs[0].dtype)
    labels = rng.integers(0, model.output_shape[-1], 4)
    history = model.fit(images, labels, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def _fake_tfds():
    import tensorflow as tf
    from PIL import Image

    photos = sorted((REPO / "examples" / "images").glob("*.jpg"))[:4]

    def load(name, split, shuffle_files=False):
        assert (name, split) == ("imagenet_v2", "test")

        def examples():
            for label, path in enumerate(photos):
                yield {"image": np.asarray(Image.open(path).convert("RGB")), "label": label}

        signature = {"image": tf.TensorSpec((None, None, 3), tf.uint8), "label": tf.TensorSpec((), tf.int64)}
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    return types.SimpleNamespace(load=load)


def test_readme_has_the_examples():
    assert len(PYTHON_BLOCKS) >= 5
    assert any("GCViTTiny(include_top=False, pooling='avg')" in block for block in PYTHON_BLOCKS)
    assert any("tfds.load('imagenet_v2'" in block for block in PYTHON_BLOCKS)


@pytest.fixture(scope="module")
def fixture_preset(tmp_path_factory):
    pytest.importorskip("keras_hub")
    from conftest import FIXTURES
    from tfgcvit.convert import convert_to_preset

    directory = tmp_path_factory.mktemp("readme") / "fixture_preset"
    convert_to_preset(FIXTURES / "custom_224.pth.tar", directory)
    return str(directory)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[_block_id(block) for block in PYTHON_BLOCKS])
def test_python_example_runs(block, fixture_constructor, monkeypatch, request):
    import tfgcvit
    from tfgcvit.model.gcvit import CONSTRUCTORS

    if "keras_hub" in block:
        from tfgcvit import hub

        preset = request.getfixturevalue("fixture_preset")
        monkeypatch.setattr(hub, "official_preset_directory", lambda name: preset)

    for name in [constructor.__name__ for constructor in CONSTRUCTORS.values()] + ["GCViTNano", "GCViTMicro"]:
        monkeypatch.setattr(tfgcvit, name, fixture_constructor)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds())
    monkeypatch.chdir(REPO)
    code = PLACEHOLDER.sub(lambda m: f"{m[1]}_{m[3]}({m[2]})", block)
    namespace = {"_compile": _compile, "_fit": _fit, "__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)


def test_variants_table_matches_the_package():
    import json

    from tfgcvit.config import parameter_count
    from tfgcvit.model.gcvit import CONSTRUCTORS, VARIANTS

    registry = json.loads((REPO / "tfgcvit" / "weights" / "official_weights.json").read_text())["checkpoints"]
    rows = re.findall(r"^\| `(\w+)`[^|]*\| `(\w+)`[^|]*\| ([\d,]+) \| ([\d, ]+) \| (\d+) \| (.*) \|$",
                      README, flags=re.M)
    assert [row[0] for row in rows] == list(VARIANTS)
    for variant, constructor, params, windows, size, top1 in rows:
        config = VARIANTS[variant]
        assert constructor == CONSTRUCTORS[variant].__name__
        assert int(params.replace(",", "")) == parameter_count(
            config["embed_dim"], config["depths"], config["num_heads"], config["window_size"],
            config["mlp_ratio"], config["layer_scale"])
        assert tuple(int(w) for w in windows.split(",")) == config["window_size"]
        assert int(size) == config["input_size"]
        published = [float(value) for value in re.findall(r"\d+\.\d", top1)]
        assert published == [entry["top1"] for entry in registry if entry["variant"] == variant]
