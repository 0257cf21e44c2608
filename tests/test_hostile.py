"""Hostile and careless input (issue 11): no hang, no memory blow-up, no silent wrong answer.

The command-line cases run the real command, `python -m tfgcvit`, in
subprocesses (a FIFO with a timeout, a real SIGINT); peak memory is measured in
child processes that import only `tfgcvit.data.images`. The limits are those of
docs/input_limits.md.
"""

import concurrent.futures
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfgcvit.weights import download
from tfgcvit.cli import MAX_INPUT_SIZE, main
from tfgcvit.data.images import (
    ImageLoadError,
    center_crop,
    evaluation_transform,
    load_image,
    resize_region,
    resize_shorter_side,
    scale_size,
)
from test_cli import messages
from weights_helpers import FIXTURES, FileServer

REPO = Path(__file__).resolve().parents[1]
CONFIG = FIXTURES / "custom_224_config.json"
CUSTOM = ["--model", "custom", "--config", str(CONFIG), "--weights", str(FIXTURES / "custom_224.pth.tar")]
PHOTO = REPO / "examples" / "images" / "cat.jpg"
RNG = np.random.default_rng(11)


def _png(path, width, height, color_type, pixels=True):
    """Writes a PNG by hand: an all-black 8-bit image (a few bytes even at 1 x 60000), or no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    # Each row: a filter byte, then one byte per pixel (grayscale).
    data = zlib.compress(b"\0" * ((width + 1) * height), 9) if pixels else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def gray_png(path, width, height):
    return _png(path, width, height, color_type=0)


def png_header_only(path, width, height):
    """A PNG that announces width x height RGB pixels and holds none: a decompression-bomb header."""
    return _png(path, width, height, color_type=2, pixels=False)


def _run(arguments, env=None, timeout=300, **options):
    return subprocess.run([sys.executable, "-m", "tfgcvit", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **options)


# ---------------------------------------------------------------------------
# The command line on bad inputs, in real processes (started two at a time).


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    fifo = root / "fifo.jpg"
    os.mkfifo(fifo)
    return dict(
        root=root,
        fifo=fifo,
        bomb=png_header_only(root / "bomb.png", 10_000, 9_000),  # 90 MP: Pillow warns, the CLI refuses
        tall=gray_png(root / "tall.png", 1, 60_000),  # 1 x 60000: 12 GB with a full resize
    )


@pytest.fixture(scope="module")
def runs(inputs):
    commands = {
        # stdin stays an open pipe nobody writes to: reading /dev/stdin would wait forever.
        "predict": (["predict", "--json", *CUSTOM, str(inputs["fifo"]), "/dev/stdin", str(inputs["bomb"]),
                     str(inputs["tall"]), str(PHOTO)], dict(stdin=subprocess.PIPE)),
        "size_typo": (["predict", "--size", "100000", *CUSTOM, str(PHOTO)], {}),
    }

    def run(item):
        name, (arguments, options) = item
        return name, _run(arguments, timeout=240, **options)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, commands.items()))


def test_predict_refuses_non_regular_files_and_bombs_and_reads_the_rest(runs, inputs):
    result = runs["predict"]  # a hang on the FIFO or /dev/stdin would have been a TimeoutExpired
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    assert "cuInit" not in result.stderr  # TensorFlow's CUDA probe is silenced too
    records = json.loads(result.stdout)["results"]
    assert [record["image"] for record in records] == [str(inputs["fifo"]), "/dev/stdin", str(inputs["bomb"]),
                                                       str(inputs["tall"]), str(PHOTO)]
    assert "not a regular file" in records[0]["error"] and "not a regular file" in records[1]["error"]
    assert "exceeds limit of 89478485 pixels" in records[2]["error"]
    assert "predictions" in records[3] and "predictions" in records[4]
    assert messages(result.stderr) == [f"tfgcvit: error: {record['error']}" for record in records[:3]] + [
        "tfgcvit: error: 3 of 5 images could not be read"]


def test_size_typo_is_refused_before_any_work(runs):
    result = runs["size_typo"]
    assert result.returncode == 2 and result.stdout == ""
    lines = messages(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tfgcvit predict: error: argument --size: size 100000 is outside 32..2048")
    assert "memory grows" in lines[0]


@pytest.mark.parametrize("arguments, message", [
    (["--size", "abc"], "argument --size: expected a whole number of pixels, 32..2048; got 'abc'"),
    (["--size", "\u00b2"], "argument --size: expected a whole number of pixels, 32..2048; got '\u00b2'"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number, 1 or more; got '0'"),
    (["--top", "five"], "argument --top: expected a whole number, 1 or more; got 'five'"),
    (["--workers", "-2"], "argument --workers: expected a whole number, 1 or more; got '-2'"),
    (["--classes", "1.5"], "argument --classes: expected a whole number, 1 or more; got '1.5'"),
    (["--crop-pct", "abc"], "argument --crop-pct: expected a number in (0, 1], such as 0.875; got 'abc'"),
    (["--crop-pct", "nan"], "argument --crop-pct: expected a number in (0, 1], such as 0.875; got 'nan'"),
])
def test_malformed_numbers_are_one_usage_line_that_names_the_option(arguments, message, capsys):
    # argparse would otherwise name the parsing function: "invalid _input_size value: 'abc'".
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *arguments, *CUSTOM, str(PHOTO)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"tfgcvit predict: error: {message} (see `tfgcvit predict --help`)\n"


@pytest.mark.parametrize("size", ["16", str(MAX_INPUT_SIZE + 1)])
def test_sizes_outside_the_limits_are_usage_errors(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--size", size, *CUSTOM, str(PHOTO)])
    assert exit_info.value.code == 2
    assert f"size {size} is outside 32..{MAX_INPUT_SIZE}" in capsys.readouterr().err


def test_custom_config_res_outside_the_limits_is_one_line(tmp_path, capsys):
    config = tmp_path / "big.json"
    config.write_text(json.dumps({**json.loads(CONFIG.read_text()), "res": 100000}))
    assert main(["predict", "--model", "custom", "--config", str(config), "--weights", CUSTOM[-1], str(PHOTO)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "res 100000 is outside 32..2048" in error


def test_load_image_does_not_wait_on_a_fifo(inputs):
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(load_image, inputs["fifo"])), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and "not a regular file" in outcome[0]


def _error_of(function, *args):
    try:
        function(*args)
    except ImageLoadError as error:
        return str(error)
    return None


def test_symlink_loop_and_unreadable_file_are_one_line(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    assert "cannot open the file" in _error_of(load_image, loop)
    assert "is a directory" in _error_of(load_image, tmp_path)


def test_tensorflow_decoding_refuses_fifos_and_bomb_headers(inputs):
    # The seed protocol decodes with TensorFlow, which has no pixel limit of its own.
    import warnings

    from tfgcvit.data.images import decode_like_tensorflow

    assert "not a regular file" in _error_of(decode_like_tensorflow, inputs["fifo"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as the command line sets it
        assert "exceeds limit of 89478485 pixels" in _error_of(decode_like_tensorflow, inputs["bomb"])


def test_seed_protocol_refuses_extreme_aspect_ratios():
    from tfgcvit.data.images import seed_port_transform

    with pytest.raises(ValueError, match=r"1x60000 pixels: an aspect ratio beyond 16:1"):
        seed_port_transform(np.zeros((60_000, 1, 3), np.uint8))
    assert seed_port_transform(np.zeros((16, 256, 3), np.uint8)).shape == (224, 224, 3)


def test_very_small_crop_pct_costs_no_memory():
    # --crop-pct 0.001 asks for a 224000-pixel resize; only the 224 x 224 centre is computed.
    image = Image.fromarray(RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for crop_mode in ("center", "squash"):
        assert evaluation_transform(image, 224, 0.001, crop_mode).shape == (224, 224, 3)


# ---------------------------------------------------------------------------
# Memory: the resize computes only the centre that the crop keeps.


def _full_resize_transform(image, size, crop_pct, crop_mode):
    """The transform as it was before the region resize: full resize, then centre crop."""
    resized = scale_size(size, crop_pct)
    if crop_mode == "squash":
        return np.asarray(center_crop(image.resize((resized, resized), Image.Resampling.BICUBIC), size))
    return np.asarray(center_crop(resize_shorter_side(image, resized), size))


def _normal_images(count):
    for _ in range(count):
        short = int(RNG.integers(16, 900))
        long = int(short * RNG.uniform(1.0, 4.0))
        height, width = (short, long) if RNG.random() < 0.5 else (long, short)
        yield Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_region_resize_equals_the_full_resize_on_normal_images():
    # Random noise is the worst case: any difference in filter weights or pass order shows.
    for index, image in enumerate(_normal_images(40)):
        size = (32, 64, 224, 384)[index % 4]
        crop_pct = (0.875, 0.9, 0.95, 1.0, 0.5)[index % 5]
        crop_mode = "squash" if index % 3 == 0 else "center"
        expected = _full_resize_transform(image, size, crop_pct, crop_mode)
        np.testing.assert_array_equal(evaluation_transform(image, size, crop_pct, crop_mode), expected,
                                      err_msg=f"{image.size} {size} {crop_pct} {crop_mode}")


@pytest.mark.parametrize("shape", [(1, 1000), (1000, 1), (2, 1500), (1500, 4), (3, 2000), (2000, 7)])
def test_region_resize_on_thin_images_is_the_full_resize_or_within_one_level(shape):
    # 1 x N and 2 x N images are exact; 3 x 2000 and 2000 x 7, whose resized
    # long sides (170666, 73142) share no power-of-two-friendly step with the
    # source, are computed from float32 box corners: a level off here and there,
    # two where the other pass's bicubic overshoot amplifies it.
    image = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
    ours = evaluation_transform(image, 224, 0.875).astype(int)
    full = _full_resize_transform(image, 224, 0.875, "center")
    if min(shape) <= 2 or max(shape) % min(shape) == 0:
        np.testing.assert_array_equal(ours, full)
    else:
        assert np.max(np.abs(ours - full)) <= 2 and np.mean(ours != full) < 0.001


def test_cutting_the_source_without_the_filter_margin_would_change_pixels():
    # Why `_axis_plan` keeps 2 * scale (+1) source pixels around the box: Pillow
    # normalises the filter over the pixels it has, so a tight cut changes the edge.
    image = Image.fromarray(RNG.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    full = np.asarray(image.resize((340, 226), Image.Resampling.BICUBIC))
    scale = 451 / 340
    left = 100
    tight = image.crop((int(left * scale), 0, 451, 300))
    box = (left * scale - int(left * scale), 0, 451 - int(left * scale), 300)
    cut = np.asarray(tight.resize((240, 226), Image.Resampling.BICUBIC, box=box))
    assert not np.array_equal(cut[:, :2], full[:, left:left + 2])
    region = resize_region(image, (340, 226), (left, 0, left + 240, 226))
    np.testing.assert_array_equal(np.asarray(region), full[:, left:left + 240])


def test_region_resize_matches_timm_on_normal_images():
    if "tensorflow" in sys.modules and "torchvision" not in sys.modules:
        pytest.skip("torchvision must be imported before TensorFlow (in conftest) to compare with timm")
    timm_data = pytest.importorskip("timm.data")
    mean, std = np.array(timm_data.IMAGENET_DEFAULT_MEAN), np.array(timm_data.IMAGENET_DEFAULT_STD)
    for index, image in enumerate(_normal_images(6)):
        crop_pct, crop_mode = ((0.875, "center"), (1.0, "squash"), (0.9, "center"))[index % 3]
        transform = timm_data.create_transform(input_size=(3, 224, 224), interpolation="bicubic",
                                               crop_pct=crop_pct, crop_mode=crop_mode)
        expected = transform(image).numpy().transpose(1, 2, 0)
        ours = evaluation_transform(image, 224, crop_pct, crop_mode)
        np.testing.assert_allclose((ours / 255.0 - mean) / std, expected, atol=1e-5)


PEAK_RSS_CHILD = """
import sys
from tfgcvit.data.images import evaluation_transform, load_image
assert "tensorflow" not in sys.modules
result = evaluation_transform(load_image(sys.argv[1]), 224, 0.875)
assert result.shape == (224, 224, 3)
# VmHWM, the peak RSS of this program alone: ru_maxrss would start from the RSS
# of the parent (pytest with TensorFlow) at the fork, which Linux carries over exec.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024)
"""


def _peak_rss(path):
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc/self/status (VmHWM)")
def test_peak_memory_stays_flat_for_1xN_images_up_to_pillows_limit(tmp_path):
    baseline = _peak_rss(gray_png(tmp_path / "square.png", 256, 256))
    # Up to Pillow's limit (89478485 pixels) for 1 x N; N x 1 up to 60 million, since
    # Pillow cannot export a row of more than 67 million RGB pixels (a one-line error).
    shapes = [(1, 6_000), (1, 60_000), (1, 600_000), (60_000, 1), (60_000_000, 1), (1, Image.MAX_IMAGE_PIXELS)]
    for width, height in shapes:
        path = gray_png(tmp_path / f"{width}x{height}.png", width, height)
        growth = _peak_rss(path) - baseline
        print(f"{width}x{height}: peak RSS +{growth / 2**20:.0f} MiB over a 256x256 image")
        # Only the decoded image may cost: 12 bytes a pixel for its RGB copies, and 8 bytes a
        # row for Pillow's row pointers in each of two copies. A full resize would need
        # 256 * 4 bytes per source pixel on top (12 GB at 1 x 60000).
        limit = 12 * width * height + 16 * height + 32 * 2**20
        assert growth < limit, f"{width}x{height}: peak RSS grew by {growth / 2**20:.0f} MiB"
        path.unlink()


# ---------------------------------------------------------------------------
# evaluate: class folders checked up front, FIFOs reported.


def test_class_index_beyond_the_model_is_refused_before_any_work(tmp_path, capsys):
    for label in ("3", "10"):  # the fixture model has 10 classes: 0..9
        (tmp_path / label).mkdir()
        (tmp_path / label / "cat.jpg").write_bytes(PHOTO.read_bytes())
    assert main(["evaluate", str(tmp_path), *CUSTOM]) == 1
    captured = capsys.readouterr()
    # One line, and no progress line: nothing was evaluated.
    assert captured.err == (f"tfgcvit: error: {tmp_path} has class index 10, beyond the model's 10 classes "
                            "(0..9)\n")


@pytest.mark.parametrize("name", ["\u0661", "\u00b2", "\uff11"])  # Arabic-Indic one, superscript two, fullwidth one
def test_class_folders_must_be_named_with_ascii_digits(tmp_path, capsys, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "cat.jpg").write_bytes(PHOTO.read_bytes())
    assert main(["evaluate", str(tmp_path), *CUSTOM]) == 1
    assert capsys.readouterr().err == (
        f"tfgcvit: error: {tmp_path}: class folders must be named by class index (0, 1, ...); found {name!r}\n")


def test_fifo_in_a_class_folder_is_reported_and_the_rest_evaluated(tmp_path, capsys):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "cat.jpg").write_bytes(PHOTO.read_bytes())
    os.mkfifo(tmp_path / "0" / "pipe.jpg")
    assert main(["evaluate", str(tmp_path), "--json", *CUSTOM]) == 1
    captured = capsys.readouterr()
    assert '"images": 1' in captured.out and '"failed": 1' in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("tfgcvit: error:")]
    assert errors == [f"tfgcvit: error: {tmp_path / '0' / 'pipe.jpg'}: not a regular file (a pipe, device or "
                      "socket); pass an image file",
                      "tfgcvit: error: 1 of 2 images could not be read and were left out of the accuracy"]


def test_symlink_loops_in_the_data_are_reported_and_the_rest_evaluated(tmp_path, capsys):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "cat.jpg").write_bytes(PHOTO.read_bytes())
    (tmp_path / "0" / "loop.jpg").symlink_to("loop.jpg")  # is_dir() raises ELOOP
    (tmp_path / "3").symlink_to("3")  # a class folder that is a loop
    (tmp_path / "loop").symlink_to("loop")  # not a class name: ignored, like files beside the class folders
    assert main(["evaluate", str(tmp_path), "--json", *CUSTOM]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["images"], result["failed"]) == (1, 2)
    errors = [line for line in captured.err.splitlines() if line.startswith("tfgcvit: error:")]
    loop_error = "cannot open the file (Too many levels of symbolic links)"
    assert errors == [f"tfgcvit: error: {tmp_path / '0' / 'loop.jpg'}: {loop_error}",
                      f"tfgcvit: error: {tmp_path / '3'}: {loop_error}",
                      "tfgcvit: error: 2 of 3 images could not be read and were left out of the accuracy"]


# ---------------------------------------------------------------------------
# Files written into the cache follow the umask; interrupted writes leave nothing.


def test_cache_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    previous = os.umask(0o022)
    try:
        with FileServer({"/w.pth": b"weights" * 100}) as server:
            path = download.fetch(server.url("/w.pth"), progress=False)
        with download.replaced_atomically(str(tmp_path / "out.npz")) as temporary:
            Path(temporary).write_bytes(b"data")
    finally:
        os.umask(previous)
    for written in (path, path + ".sha256", tmp_path / "out.npz"):
        assert os.stat(written).st_mode & 0o777 == 0o644, written


def test_pending_temporaries_are_removed_on_interrupt(tmp_path):
    destination = tmp_path / "model.weights.h5"
    with pytest.raises(KeyboardInterrupt):
        with download.replaced_atomically(str(destination), suffix=".tmp.weights.h5") as temporary:
            Path(temporary).write_bytes(b"half")
            assert download._PENDING == {temporary}
            download.remove_pending_files()  # what the SIGINT handler of the command does
            assert not os.path.exists(temporary)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [] and not download._PENDING


def test_temporaries_are_pending_from_the_moment_they_exist(tmp_path, monkeypatch):
    # A SIGINT between the creation and the registration would leave the file behind.
    real_open, real_mkdir, pending_at_creation = os.open, os.mkdir, []

    def spy(create):
        def wrapper(path, *args, **kwargs):
            pending_at_creation.append(path in download._PENDING)
            return create(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "open", spy(real_open))
    monkeypatch.setattr(os, "mkdir", spy(real_mkdir))
    with download.replaced_atomically(str(tmp_path / "picture.png"), suffix=".png"):
        pass
    with download.replaced_atomically(str(tmp_path / "gcvit"), suffix=".savedmodel", folder=True):
        pass
    assert pending_at_creation == [True, True] and not download._PENDING


def test_pending_temporary_folders_are_removed_on_interrupt(tmp_path):
    destination = tmp_path / "gcvit"  # a SavedModel (tfgcvit export)
    with pytest.raises(KeyboardInterrupt):
        with download.replaced_atomically(str(destination), suffix=".savedmodel", folder=True) as temporary:
            (Path(temporary) / "variables").mkdir()
            (Path(temporary) / "saved_model.pb").write_bytes(b"half")
            assert download._PENDING == {temporary}
            download.remove_pending_files()
            assert not os.path.exists(temporary)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [] and not download._PENDING


def _interrupt_when(process, ready, timeout=240, poll=0.2):
    """Sends SIGINT to `process` once `ready()` holds (polled every `poll` s); gives (code, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command never got to work"
        time.sleep(poll)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


@pytest.mark.parametrize("command", ["convert", "evaluate"])
def test_sigint_exits_130_with_one_line_and_no_partial_file(tmp_path, command):
    home = tmp_path / "home"
    checkpoints = home / "checkpoints"
    destination = tmp_path / "out" / "model.weights.h5"
    data = tmp_path / "data"
    (data / "0").mkdir(parents=True)
    (data / "0" / "cat.jpg").write_bytes(PHOTO.read_bytes())
    with FileServer({"/big.pth.tar": b"\0" * (8 << 20)}, modes={"/big.pth.tar": "stall"}) as server:
        url = server.url("/big.pth.tar")
        arguments = {
            "convert": ["convert", url, str(destination)],
            "evaluate": ["evaluate", str(data), "--model", "custom", "--config", str(CONFIG), "--weights", url],
        }[command]
        process = subprocess.Popen([sys.executable, "-m", "tfgcvit", *arguments], cwd=REPO, text=True,
                                   env={**os.environ, "TFGCVIT_HOME": str(home)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Interrupted mid-download: half the file has arrived in a temporary file.
            code, stderr = _interrupt_when(process, lambda: any(checkpoints.glob(".big.pth.tar.*.part")))
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 130, stderr
    assert messages(stderr) == ["tfgcvit: error: interrupted"]
    assert [path.name for path in checkpoints.iterdir()] == ["big.pth.tar.lock"]  # no partial download
    assert not destination.exists() and not destination.parent.exists()


def test_sigint_while_explain_writes_a_picture_leaves_no_partial_file(tmp_path):
    out = tmp_path / "maps"
    # At 448 x 448 a picture (2688 x 506, 1.5 MB) took 1 s to write here: long enough to be interrupted in it.
    arguments = ["explain", *CUSTOM, "--size", "448", "--batch-size", "1", "--out", str(out),
                 *[str(PHOTO)] * 4]
    process = subprocess.Popen([sys.executable, "-m", "tfgcvit", *arguments], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Interrupted as soon as the first file appears: the picture being written.
        code, stderr = _interrupt_when(process, lambda: out.is_dir() and any(out.iterdir()), poll=0.001)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 130, stderr
    assert messages(stderr) == ["tfgcvit: error: interrupted"]
    for path in out.iterdir():  # pictures finished before the interrupt, whole; no temporary file
        assert path.name in {"cat_explain.png", "cat_explain_2.png", "cat_explain_3.png"}, path.name
        with Image.open(path) as picture:
            picture.load()
