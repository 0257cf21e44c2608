"""End-to-end tests of the `tfgcvit` command.

The main paths (predict, evaluate with a broken file, failing downloads, a usage
error) run the real command, `python -m tfgcvit`, in subprocesses. Each
pays the TensorFlow import (5-10 s here), so those commands are started together
by one module fixture, a few at a time, and the tests then check their results.
The remaining cases call `tfgcvit.cli.main()` in this process: the same code
without a start-up per case. Every command uses the tiny 10-class fixture
checkpoint (`--model custom`), so nothing downloads. Expected outputs come from
the fixture model run in this process on the same preprocessing.
"""

import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, OFFICIAL_PARAMS, REPO, run_tflite, tflite_interpreter
from tfgcvit.cli import main
from tfgcvit.config import parameter_count

CHECKPOINT = FIXTURES / "custom_224.pth.tar"
CONFIG = FIXTURES / "custom_224_config.json"
SAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))
CUSTOM = ["--model", "custom", "--config", str(CONFIG), "--weights", str(CHECKPOINT)]
# The fixture evaluates like timm's default test transform (no registry entry for it).
SIZE, CROP_PCT = 224, 0.875
PARALLEL_COMMANDS = 3
only_tensorflow = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
                                     reason="export runs on the TensorFlow backend")

# TensorFlow's C++ start-up lines, printed while `import tfgcvit` loads Keras,
# before the command can silence them. Everything else on stderr is checked.
NATIVE_START_UP = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|To enable the following instructions:)"
)



def messages(stderr):
    """The lines of stderr written by tfgcvit (TensorFlow's start-up lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not NATIVE_START_UP.match(line)]


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def reference_probabilities(model, images):
    from tfgcvit import preprocess_input

    return softmax(np.asarray(model.predict(preprocess_input(np.stack(images)), verbose=0), np.float64))


def official_inputs(paths):
    from tfgcvit.data.images import evaluation_transform, load_image

    return [evaluation_transform(load_image(path), SIZE, CROP_PCT, "center") for path in paths]


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _derived_images(folder):
    """Twelve images of several formats, modes and sizes made from the sample photos."""
    photos = {path.stem: Image.open(path) for path in SAMPLES}
    paths = []
    for path in SAMPLES:
        shutil.copy(path, folder / path.name)
        paths.append(folder / path.name)
    made = {}
    made["cat_left.png"] = photos["cat"].crop((0, 0, 225, 300))
    coffee = photos["coffee"].convert("RGBA")
    coffee.putalpha(200)
    made["coffee_alpha.png"] = coffee
    made["astronaut_mirrored.jpg"] = photos["astronaut"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    made["rocket_gray.png"] = photos["rocket"].convert("L")
    made["camera_16bit.png"] = Image.fromarray(np.asarray(photos["camera"].convert("L"), np.uint16) * 257)
    made["cat_rotated.png"] = photos["cat"].transpose(Image.Transpose.ROTATE_90)
    made["coffee_small.jpg"] = photos["coffee"].resize((100, 80))
    for name, image in made.items():
        path = folder / name
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixture_model):
    """Images, the fixture model's probabilities for them, and labelled folders.

    The dataset's labels are chosen from the model's own ranking: the first six
    images get their top-1 class, the next three their third-ranked class and
    the last three their last-ranked class, so top-1 is 6/12 and top-5 9/12.
    """
    root = tmp_path_factory.mktemp("cli")
    loose = root / "images"
    loose.mkdir()
    paths = _derived_images(loose)
    probabilities = reference_probabilities(fixture_model, official_inputs(paths))
    ranking = np.argsort(-probabilities, axis=-1, kind="stable")
    ordered = np.take_along_axis(probabilities, ranking, axis=-1)
    # The chosen ranks must not hinge on float noise between this process and the command.
    assert np.all(np.abs(np.diff(ordered[:, [0, 1, 2, 3, 4, 5, 8, 9]])) > 1e-5)

    dataset = root / "dataset"
    labels = {}
    for index, path in enumerate(paths):
        rank = 0 if index < 6 else 2 if index < 9 else 9
        label = int(ranking[index, rank])
        (dataset / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dataset / str(label) / path.name)
        labels[path.name] = label
    broken_dataset = root / "broken_dataset"
    shutil.copytree(dataset, broken_dataset)
    (broken_dataset / "0").mkdir(exist_ok=True)
    (broken_dataset / "0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (broken_dataset / "0" / ".DS_Store").write_bytes(b"hidden files are ignored")

    empty = root / "empty"
    empty.mkdir()
    named = root / "named"
    for name in ("cat", "dog"):
        (named / name).mkdir(parents=True)
        shutil.copy(paths[0], named / name / "a.jpg")
    no_files = root / "no_files"
    for name in ("0", "1"):
        (no_files / name).mkdir(parents=True)
    (root / "labels.txt").write_text("".join(f"thing number {i}\n" for i in range(10)))
    (root / "not_json.json").write_text("dim: 16\n")
    mirror = root / "mirror"
    mirror.mkdir()
    return dict(root=root, paths=paths, probabilities=probabilities, labels=labels, dataset=dataset,
                broken_dataset=broken_dataset, empty=empty, named=named, no_files=no_files, mirror=mirror)


def _commands(data):
    root, paths = data["root"], [str(path) for path in data["paths"]]
    missing = str(root / "absent.jpg")
    not_an_image = str(REPO / "examples" / "images" / "ATTRIBUTION.md")
    photo = paths[0]
    offline = {"TFGCVIT_HOME": str(root / "home"), "TFGCVIT_MIRROR": str(data["mirror"])}
    return {
        "predict_json": (["predict", "--json", "--top", "5", "--batch-size", "4", *CUSTOM,
                          *paths[:5], not_an_image, *paths[5:], missing], {}),
        "evaluate_broken": (["evaluate", str(data["broken_dataset"]), *CUSTOM], {}),
        "unreachable_weights": (["predict", "--model", "custom", "--config", str(CONFIG), "--weights",
                                 f"http://127.0.0.1:{closed_port()}/gcvit.pth.tar", photo],
                                {"TFGCVIT_HOME": str(root / "home")}),
        "pretrained_offline": (["predict", "--model", "xxtiny", photo], offline),
        "no_images": (["predict", *CUSTOM], {}),
    }


@pytest.fixture(scope="module")
def runs(data):
    """Runs every command once; name -> CompletedProcess."""
    commands = _commands(data)

    def run(item):
        name, (arguments, extra_env) = item
        env = {**os.environ, **extra_env}
        completed = subprocess.run([sys.executable, "-m", "tfgcvit", *arguments], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=300)
        return name, completed

    with concurrent.futures.ThreadPoolExecutor(PARALLEL_COMMANDS) as pool:
        return dict(pool.map(run, commands.items()))


def _error_line(result, code=1):
    """Checks exit code, no traceback and a single message line; returns the line."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = messages(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_predict_json_matches_the_model_and_reports_bad_files(runs, data):
    result = runs["predict_json"]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    output = json.loads(result.stdout)
    assert (output["size"], output["crop_pct"], output["crop_mode"]) == (SIZE, CROP_PCT, "center")
    records = output["results"]
    good = [record for record in records if "predictions" in record]
    bad = [record for record in records if "error" in record]
    # Command-line order, with the failures in place.
    assert [record["image"] for record in records[:5]] == [str(path) for path in data["paths"][:5]]
    assert records[5]["image"].endswith("ATTRIBUTION.md") and records[-1]["image"].endswith("absent.jpg")
    assert [record["image"] for record in good] == [str(path) for path in data["paths"]]
    assert "not an image file" in bad[0]["error"] and "no such file" in bad[1]["error"]
    lines = messages(result.stderr)
    assert lines == [f"tfgcvit: error: {bad[0]['error']}", f"tfgcvit: error: {bad[1]['error']}",
                     f"tfgcvit: error: 2 of {len(data['paths']) + 2} images could not be read"]
    for record, expected in zip(good, data["probabilities"]):
        indices = [prediction["index"] for prediction in record["predictions"]]
        np.testing.assert_array_equal(indices, np.argsort(-expected, kind="stable")[:5])
        np.testing.assert_allclose([p["probability"] for p in record["predictions"]], expected[indices], atol=1e-5)
        # A 10-class head has no ImageNet names: labels are the class indices.
        assert [prediction["label"] for prediction in record["predictions"]] == [str(i) for i in indices]


def test_predict_text_uses_the_labels_file(data, capsys):
    photo = data["paths"][0]
    code = main(["predict", *CUSTOM, "--labels", str(data["root"] / "labels.txt"), "--top", "2", str(photo)])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    expected = data["probabilities"][0]
    best = np.argsort(-expected, kind="stable")[:2]
    lines = captured.out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 3
    for rank, (line, index) in enumerate(zip(lines[1:], best), 1):
        assert re.fullmatch(rf"  {rank}\. (\d\.\d{{4}})  thing number {index}", line), line
        assert abs(float(line.split()[1]) - expected[index]) < 1e-4


def _accuracy_from_predict(runs, data, k):
    records = json.loads(runs["predict_json"].stdout)["results"]
    hits = [data["labels"][Path(record["image"]).name] in [p["index"] for p in record["predictions"][:k]]
            for record in records if "predictions" in record]
    return sum(hits) / len(hits)


def test_evaluate_json_agrees_with_predict(runs, data, capsys):
    code = main(["evaluate", str(data["dataset"]), "--json", "--batch-size", "5", *CUSTOM])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    output = json.loads(captured.out)
    assert output["images"] == 12 and output["failed"] == 0 and output["protocol"] == "official"
    assert output["top1"] == pytest.approx(6 / 12) == _accuracy_from_predict(runs, data, 1)
    assert output["top5"] == pytest.approx(9 / 12) == _accuracy_from_predict(runs, data, 5)
    assert output["images_per_second"] > 0
    assert re.search(r"100%\|#+\| 12/12 \[[\d:]+<[\d:]+, +[\d.]+img/s\]\n$", captured.err), captured.err


def test_evaluate_reports_a_broken_file_and_scores_the_rest(runs):
    result = runs["evaluate_broken"]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.fullmatch(r"top1 0\.5000 top5 0\.7500 \(12 images, \d+\.\d img/s\)", result.stdout.strip())
    errors = [line for line in messages(result.stderr) if line.startswith("tfgcvit: error:")]
    assert len(errors) == 2
    assert re.fullmatch(r"tfgcvit: error: \S+/0/broken\.jpg: cannot decode the image .*", errors[0])
    assert errors[1] == "tfgcvit: error: 1 of 13 images could not be read and were left out of the accuracy"


def test_evaluate_seed_protocol_with_limit(data, fixture_model, capsys):
    from tfgcvit.data.images import decode_like_tensorflow, seed_port_transform

    code = main(["evaluate", str(data["dataset"]), "--protocol", "seed", "--limit", "6", "--json", *CUSTOM])
    output = json.loads(capsys.readouterr().out)
    assert code == 0
    assert output["protocol"] == "seed" and output["images"] == 6
    # --limit 6 of 12 images sorted by class then name takes every second one.
    items = sorted((label, name) for name, label in data["labels"].items())[::2]
    images = [seed_port_transform(decode_like_tensorflow(data["dataset"] / str(label) / name), SIZE)
              for label, name in items]
    best = np.argsort(-reference_probabilities(fixture_model, images), axis=-1, kind="stable")
    labels = np.array([label for label, _ in items])
    assert output["top1"] == pytest.approx(np.mean(best[:, 0] == labels))
    assert output["top5"] == pytest.approx(np.mean(np.any(best[:, :5] == labels[:, None], axis=1)))


def test_unreachable_weights_are_one_line(runs):
    line = _error_line(runs["unreachable_weights"])
    assert re.fullmatch(r"tfgcvit: error: .*[Dd]ownload.*http://127\.0\.0\.1:\d+/gcvit\.pth\.tar.*", line)


# More bad inputs, through `main()` in this process: the same code as the command
# without paying a TensorFlow start-up for each.
@pytest.mark.parametrize(
    "arguments, pattern",
    [
        (lambda d: ["predict", *CUSTOM, str(d["root"] / "absent.jpg")], r"\S+/absent\.jpg: no such file"),
        (lambda d: ["predict", *CUSTOM, str(REPO / "examples" / "images" / "ATTRIBUTION.md")],
         r"\S+/ATTRIBUTION\.md: not an image file Pillow can read"),
        (lambda d: ["predict", "--model", "gigantic", str(SAMPLES[0])],
         r"unknown model 'gigantic'; choose one of xxtiny, .*"),
        (lambda d: ["predict", "--model", "custom", "--config", str(CONFIG), "--weights",
                    str(d["root"] / "absent.pth.tar"), str(SAMPLES[0])],
         r".*absent\.pth\.tar.*(does not exist|No such file).*"),
        (lambda d: ["predict", "--model", "custom", "--config", str(d["root"] / "not_json.json"),
                    "--weights", str(CHECKPOINT), str(SAMPLES[0])],
         r"\S+not_json\.json: not a JSON config file .*"),
        (lambda d: ["predict", "--model", "custom", "--weights", str(CHECKPOINT), str(SAMPLES[0])],
         r"--model custom needs --config FILE .*"),
        (lambda d: ["evaluate", str(d["root"] / "absent"), *CUSTOM], r"\S+/absent: no such folder"),
        (lambda d: ["evaluate", str(SAMPLES[0]), *CUSTOM], r"\S+\.jpg: not a folder .*"),
        (lambda d: ["evaluate", str(d["empty"]), *CUSTOM], r"\S+/empty: no class folders .*"),
        (lambda d: ["evaluate", str(d["named"]), *CUSTOM],
         r"\S+/named: class folders must be named by class index .*'cat', 'dog'"),
        (lambda d: ["evaluate", str(d["no_files"]), *CUSTOM], r"\S+/no_files: the class folders hold no files"),
        (lambda d: ["export", str(d["root"] / "model.pb"), *CUSTOM],
         r"\S+/model\.pb: name the file \*\.onnx \(ONNX\) or \*\.tflite \(TFLite\), or give a name without a "
         r"suffix for a TensorFlow SavedModel folder; .*"),
        (lambda d: ["export", str(d["root"] / "saved_gcvit"), "--int8", *CUSTOM],
         r"--int8 quantises ONNX and TFLite files; a SavedModel keeps float32 weights \(name the output \*\.onnx "
         r"or \*\.tflite\)"),
        (lambda d: ["export", str(d["root"] / "absent" / "model.onnx"), *CUSTOM], r"\S+/absent: no such folder"),
        (lambda d: ["export", str(d["root"] / "model.onnx"), "--model", "gigantic"],
         r"unknown model 'gigantic'; choose one of xxtiny, .*"),
    ],
    ids=["missing_image", "not_an_image", "unknown_model", "missing_weights", "bad_config",
         "custom_without_config", "missing_folder", "file_as_folder", "empty_folder", "named_folders", "no_files",
         "export_unknown_suffix", "export_int8_saved_model", "export_missing_folder", "export_unknown_model"],
)
def test_bad_input_is_one_line_and_exit_code_1(data, capsys, arguments, pattern):
    assert main(arguments(data)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(f"tfgcvit: error: {pattern}\n", captured.err), captured.err


@only_tensorflow
def test_export_writes_a_tflite_file_that_classifies_like_the_model(data, golden, capsys, tmp_path):
    output = tmp_path / "gcvit.tflite"
    output.write_text("an older export")
    assert main(["export", str(output), *CUSTOM]) == 1
    assert capsys.readouterr().err == f"tfgcvit: error: {output} exists; pass --overwrite to replace it\n"
    assert output.read_text() == "an older export"

    # A fixed size, taking pixels: float32, so equal to the official outputs to float noise.
    assert main(["export", str(output), "--overwrite", "--json", "--size", "224", "--include-preprocessing",
                 *CUSTOM]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "litert" and not record["int8"] and record["include_preprocessing"]
    assert record["input_shape"] == [None, 224, 224, 3]
    assert record["bytes"] == output.stat().st_size and record["classes"] == 10
    assert [path.name for path in tmp_path.iterdir()] == ["gcvit.tflite"]  # no temporary left behind
    from tfgcvit.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    pixels = (golden["inputs"] * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)) * np.float32(255)
    assert list(tflite_interpreter(output).get_input_details()[0]["shape_signature"]) == [-1, 224, 224, 3]
    probabilities = run_tflite(output, pixels)
    np.testing.assert_allclose(probabilities, softmax(golden["logits"]), rtol=0, atol=1e-5)

    # --int8: TFLite's dynamic-range quantisation. Measured on the fixture: top-1 kept on 8 of 8
    # images, logits within 0.12 (bench/tflite_ab.py accuracy); here the probabilities.
    quantized = tmp_path / "gcvit_int8.tflite"
    assert main(["export", str(quantized), "--int8", "--json", "--size", "224", "--include-preprocessing",
                 *CUSTOM]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "litert" and record["int8"]
    assert quantized.stat().st_size < 0.75 * output.stat().st_size
    int8_probabilities = run_tflite(quantized, pixels)
    np.testing.assert_array_equal(int8_probabilities.argmax(-1), golden["logits"].argmax(-1))
    assert 1e-5 < np.abs(int8_probabilities - probabilities).max() < 0.05


@only_tensorflow
def test_export_writes_a_saved_model_folder_that_serves_any_size(data, golden, capsys, monkeypatch, tmp_path):
    import tensorflow as tf

    import tfgcvit.export

    # A folder that is not a SavedModel is never replaced, not even with --overwrite.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    assert main(["export", str(notes), "--overwrite", *CUSTOM]) == 1
    assert capsys.readouterr().err == (f"tfgcvit: error: {notes} exists and is not a SavedModel folder; "
                                       "choose another name\n")
    assert [path.name for path in notes.iterdir()] == ["keep.txt"]

    output = tmp_path / "gcvit"
    assert main(["export", f"{output}/", "--json", *CUSTOM]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "tf_saved_model" and record["input_shape"] == [None, None, None, 3]
    assert record["bytes"] == sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    loaded = tf.saved_model.load(str(output))  # held: `serve` alone does not keep the variables alive
    serve = loaded.serve
    np.testing.assert_allclose(serve(tf.constant(golden["inputs"])).numpy(), softmax(golden["logits"]),
                               rtol=0, atol=1e-5)
    assert serve(tf.zeros((3, 97, 131, 3))).shape == (3, 10)  # any batch, height and width

    # An existing SavedModel needs --overwrite and is then replaced whole; a failed
    # export leaves it as it was. (The export itself is stubbed: it was checked above.)
    def export_model(model, path, format):
        if format != "tf_saved_model":
            raise ValueError(f"unexpected format {format}")
        if model.input_shape != (None, 224, 224, 3):
            raise ValueError("an export that fails")
        (Path(path) / "saved_model.pb").write_bytes(b"the new export")

    monkeypatch.setattr(tfgcvit.export, "export_model", export_model)
    (output / "stale.txt").write_text("from the first export")
    assert main(["export", str(output), "--size", "224", *CUSTOM]) == 1
    assert capsys.readouterr().err == f"tfgcvit: error: {output} exists; pass --overwrite to replace it\n"
    assert main(["export", str(output), "--overwrite", *CUSTOM]) == 1
    assert capsys.readouterr().err == "tfgcvit: error: an export that fails\n"
    assert (output / "stale.txt").exists()
    assert main(["export", str(output), "--overwrite", "--size", "224", *CUSTOM]) == 0
    assert [path.name for path in output.iterdir()] == ["saved_model.pb"]
    assert (output / "saved_model.pb").read_bytes() == b"the new export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gcvit", "notes"]  # no temporaries


def _small_onnx_file(path):
    """A convolution then a dense layer, as a float32 ONNX file (what the int8 step sees)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("conv_w", (4, 3, 3, 3)), ("dense_w", (256, 10)))]
    weights.append(numpy_helper.from_array(np.array([-1, 256], np.int64), "flat"))
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "dense_w"], ["y"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@only_tensorflow
def test_export_int8_quantises_the_exported_onnx_files_dense_layers(data, capsys, monkeypatch, tmp_path):
    """`--int8` runs `quantize_onnx` on what `export_model` wrote (the ONNX export itself: test_export.py)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import tfgcvit.export

    exported = []

    def export_model(model, path, format):
        exported.append((model.input_shape, format))
        _small_onnx_file(path)

    monkeypatch.setattr(tfgcvit.export, "export_model", export_model)
    for options, dense_op in (([], "MatMul"), (["--int8"], "MatMulInteger")):
        output = tmp_path / f"gcvit{len(exported)}.onnx"
        assert main(["export", str(output), *options, *CUSTOM]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {output} ({'int8 ' if options else ''}onnx, ")
        ops = {node.op_type for node in onnx.load(str(output)).graph.node}
        assert dense_op in ops and "Conv" in ops and "ConvInteger" not in ops
    assert exported == [((None, None, None, 3), "onnx")] * 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gcvit0.onnx", "gcvit1.onnx"]


def test_export_on_another_backend_says_which_to_use(data, capsys, monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert main(["export", str(data["root"] / "model.onnx"), *CUSTOM]) == 1
    assert capsys.readouterr().err == ("tfgcvit: error: ONNX export runs on the TensorFlow backend (the Keras "
                                       "backend here is 'jax'); run it with KERAS_BACKEND=tensorflow\n")
    assert not (data["root"] / "model.onnx").exists()


def test_export_without_the_onnx_packages_names_the_extra(data, capsys, monkeypatch):
    import tfgcvit.export

    def missing(*args, **kwargs):
        raise ImportError("This requires the tf2onnx module.")

    monkeypatch.setattr(tfgcvit.export, "export_model", missing)
    assert main(["export", str(data["root"] / "model.onnx"), *CUSTOM]) == 1
    assert capsys.readouterr().err == ("tfgcvit: error: This requires the tf2onnx module. (pip install "
                                       "'tfgcvit[onnx]' installs what ONNX export needs)\n")
    assert not list(data["root"].glob("*model.onnx*"))  # the temporary file is gone too


def test_pretrained_weights_offline_fail_with_one_error_line(runs):
    result = runs["pretrained_offline"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in messages(result.stderr) if line.startswith("tfgcvit: error:")]
    assert len(errors) == 1
    assert "gcvit_1k_xxtiny.pth.tar" in errors[0]
    assert messages(result.stderr)[-1] == errors[0]


def test_tfds_source_without_data_is_a_clear_error(data, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(data["root"] / "tfds"))
    assert main(["evaluate", "tfds:imagenet_v2", *CUSTOM]) == 1
    error = capsys.readouterr().err
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        assert error.startswith("tfgcvit: error: tfds:imagenet_v2 needs tensorflow-datasets")
    else:
        assert error.startswith("tfgcvit: error: cannot load tfds:imagenet_v2")
    assert error.count("\n") == 1


def test_missing_argument_is_a_usage_error(runs):
    line = _error_line(runs["no_images"], code=2)
    assert line.startswith("tfgcvit predict: error: the following arguments are required: IMAGE")


def test_info_lists_every_checkpoint_with_counted_parameters(data, capsys, monkeypatch):
    from tfgcvit.model.gcvit import VARIANTS

    monkeypatch.setenv("TFGCVIT_HOME", str(data["root"] / "home"))
    assert main(["info", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["variants"]
    registry = json.loads((REPO / "tfgcvit" / "weights" / "official_weights.json").read_text())["checkpoints"]
    assert [(row["variant"], row["pretrain"], row["top1"]) for row in rows] == [
        (entry["variant"], entry["pretrain"], entry["top1"])
        for variant in VARIANTS for entry in registry if entry["variant"] == variant
    ]
    for row in rows:
        assert row["params"] == OFFICIAL_PARAMS[row["variant"]]
        assert row["input_size"] == VARIANTS[row["variant"]]["input_size"]
        assert row["license"] == "CC-BY-NC-SA-4.0"
        entry = next(e for e in registry if (e["variant"], e["pretrain"]) == (row["variant"], row["pretrain"]))
        assert (row["crop_pct"], row["crop_mode"]) == (entry["crop_pct"], entry["crop_mode"])
        assert row["cached"] is False  # nothing is downloaded in the tests' cache


def test_parameter_count_matches_the_official_models():
    from tfgcvit.model.gcvit import VARIANTS

    for name, config in VARIANTS.items():
        counted = parameter_count(config["embed_dim"], config["depths"], config["num_heads"],
                                   config["window_size"], config["mlp_ratio"], config["layer_scale"])
        assert counted == OFFICIAL_PARAMS[name], name


def test_parameter_count_matches_keras(fixture_model):
    from conftest import FIXTURE_CONFIG

    config = FIXTURE_CONFIG
    assert parameter_count(config["embed_dim"], config["depths"], config["num_heads"], config["window_size"],
                            config["mlp_ratio"], config["layer_scale"], config["classes"]) \
        == fixture_model.count_params()


def test_convert_is_delegated_to_the_converter(capsys, tmp_path):
    # The fixture's custom architecture is no official variant: the converter itself says so.
    assert main(["convert", str(CHECKPOINT), str(tmp_path / "fixture.weights.h5")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("tfgcvit convert: error: The checkpoint matches no official GC ViT variant")
    assert not (tmp_path / "fixture.weights.h5").exists()
