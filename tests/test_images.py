"""Image loading (every Pillow mode to RGB uint8, EXIF) and the evaluation transforms."""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from tfgcvit.data.images import (
    ImageLoadError,
    center_crop,
    decode_like_tensorflow,
    evaluation_transform,
    load_image,
    resize_shorter_side,
    seed_port_transform,
    to_rgb,
)

RNG = np.random.default_rng(0)
HEIGHT, WIDTH = 12, 16


def _save(image, path, **options):
    image.save(path, **options)
    return path


def _gray_rgb(values):
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


@pytest.fixture
def rgb():
    return RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_rgb_png_is_read_unchanged(tmp_path, rgb):
    path = _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    result = load_image(path)
    assert result.dtype == np.uint8 and result.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(result, rgb)


def test_grayscale_is_repeated_on_three_channels(tmp_path):
    gray = RNG.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    path = _save(Image.fromarray(gray, "L"), tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(path), _gray_rgb(gray))


def test_rgba_is_composited_on_white(tmp_path, rgb):
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[:, WIDTH // 2:] = 255  # right half opaque
    alpha[0, 0] = 128  # one half-transparent pixel
    path = _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), tmp_path / "rgba.png")
    result = load_image(path).astype(int)
    np.testing.assert_array_equal(result[:, WIDTH // 2:], rgb[:, WIDTH // 2:])
    np.testing.assert_array_equal(result[1:, : WIDTH // 2], 255)
    # alpha 128/255 over white, to within Pillow's integer rounding.
    expected = rgb[0, 0].astype(float) * 128 / 255 + 255 * (1 - 128 / 255)
    np.testing.assert_allclose(result[0, 0], expected, atol=1)


def test_la_is_composited_on_white(tmp_path):
    gray = np.full((HEIGHT, WIDTH), 40, np.uint8)
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[: HEIGHT // 2] = 255
    path = _save(Image.fromarray(np.dstack([gray, alpha]), "LA"), tmp_path / "la.png")
    result = load_image(path)
    np.testing.assert_array_equal(result[: HEIGHT // 2], 40)
    np.testing.assert_array_equal(result[HEIGHT // 2:], 255)


def test_palette_image_uses_its_colours(tmp_path):
    indices = RNG.integers(0, 4, (HEIGHT, WIDTH), dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.flatten().tolist())
    path = _save(image, tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(path), colours[indices])


def test_palette_transparency_is_composited_on_white(tmp_path):
    indices = np.zeros((HEIGHT, WIDTH), np.uint8)
    indices[:, WIDTH // 2:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (3 * 254))
    path = _save(image, tmp_path / "transparent.gif", transparency=0)
    result = load_image(path)
    np.testing.assert_array_equal(result[:, : WIDTH // 2], 255)
    np.testing.assert_array_equal(result[:, WIDTH // 2:], np.broadcast_to([200, 100, 50], (HEIGHT, WIDTH // 2, 3)))


def test_cmyk_is_converted_to_rgb(tmp_path):
    cmyk = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    cmyk[:, : WIDTH // 2, 0] = 255  # full cyan
    cmyk[:, WIDTH // 2:, 3] = 255  # full black
    path = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tiff")
    result = load_image(path)
    np.testing.assert_array_equal(result[:, : WIDTH // 2], np.broadcast_to([0, 255, 255], (HEIGHT, WIDTH // 2, 3)))
    np.testing.assert_array_equal(result[:, WIDTH // 2:], 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_is_scaled_to_8_bits(mode):
    values = np.array([[0, 257, 32896, 65535], [1000, 2570, 50000, 65000]], np.uint16)
    image = Image.fromarray(values)
    if mode != "I;16":
        image = Image.frombytes(mode, image.size, values.astype(">u2").tobytes())
    assert image.mode == mode
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), _gray_rgb(expected))


def test_16_bit_png_file_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(load_image(path), _gray_rgb(expected))


def test_32_bit_integer_image_is_read_as_16_bit_and_clipped():
    values = np.array([[-5, 0, 257, 65535, 70000]], np.int32)
    result = np.asarray(to_rgb(Image.fromarray(values, "I")))
    np.testing.assert_array_equal(result, _gray_rgb([[0, 0, 1, 255, 255]]))


def test_float_image_is_rounded_and_clipped():
    values = np.array([[-3.0, 0.4, 127.6, 255.0, 300.0]], np.float32)
    result = np.asarray(to_rgb(Image.fromarray(values, "F")))
    np.testing.assert_array_equal(result, _gray_rgb([[0, 0, 128, 255, 255]]))


def test_one_bit_image_is_black_and_white(tmp_path):
    bits = RNG.integers(0, 2, (HEIGHT, WIDTH)).astype(bool)
    path = _save(Image.fromarray(bits), tmp_path / "bits.png")
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(load_image(path), _gray_rgb(bits * 255))


def test_ycbcr_image_is_converted_with_pillow(rgb):
    ycbcr = Image.fromarray(rgb).convert("YCbCr")
    np.testing.assert_array_equal(np.asarray(to_rgb(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def test_multi_frame_file_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "frames.tiff"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(load_image(path), np.broadcast_to([255, 0, 0], (HEIGHT, WIDTH, 3)))


def test_exif_orientation_is_applied(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = _save(image, tmp_path / "rotated.png", exif=exif)
    upright = load_image(path)
    assert upright.shape == (WIDTH, HEIGHT, 3)
    np.testing.assert_array_equal(upright, np.rot90(rgb, k=-1))
    np.testing.assert_array_equal(load_image(path, apply_exif=False), rgb)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent.jpg", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: _write(tmp / "notes.jpg", b"these are words, not pixels\n"), "not an image file"),
        (lambda tmp: _write(tmp / "cut.jpg", _jpeg_bytes()[:300]), "cannot decode"),
    ],
    ids=["missing", "directory", "text", "truncated"],
)
def test_unreadable_files_raise_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def _write(path, data):
    path.write_bytes(data)
    return path


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_resize_shorter_side_truncates_the_longer_side_like_torchvision():
    landscape = Image.new("RGB", (451, 300))
    assert resize_shorter_side(landscape, 256).size == (384, 256)  # int(256 * 451 / 300) = int(384.85)
    portrait = Image.new("RGB", (300, 451))
    assert resize_shorter_side(portrait, 256).size == (256, 384)


@pytest.mark.parametrize("width, left", [(256, 0), (257, 0), (258, 1), (259, 2), (261, 2)])
def test_center_crop_rounds_half_to_even_like_torchvision(width, left):
    columns = np.tile(np.arange(width, dtype=np.uint8)[None, :, None], (256, 1, 3))
    crop = np.asarray(center_crop(columns, 256))
    assert crop.shape == (256, 256, 3)
    assert crop[0, 0, 0] == left


@pytest.mark.parametrize(
    "size, crop_pct, crop_mode, shape",
    [(224, 0.875, "center", (300, 451)), (224, 1.0, "center", (451, 300)), (64, 1.0, "squash", (300, 451)),
     (64, 0.9, "squash", (97, 130))],
)
def test_evaluation_transform_matches_timm(size, crop_pct, crop_mode, shape):
    if "tensorflow" in sys.modules and "torchvision" not in sys.modules:
        # On this stack torchvision segfaults when it is first imported after TensorFlow.
        pytest.skip("torchvision must be imported before TensorFlow (in conftest) to compare with timm")
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(
        input_size=(3, size, size), interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode
    )
    image = Image.fromarray(RNG.integers(0, 256, (*shape, 3), dtype=np.uint8))
    expected = transform(image).numpy().transpose(1, 2, 0)
    ours = evaluation_transform(image, size, crop_pct, crop_mode)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    mean, std = np.array(timm_data.IMAGENET_DEFAULT_MEAN), np.array(timm_data.IMAGENET_DEFAULT_STD)
    np.testing.assert_allclose((ours / 255.0 - mean) / std, expected, atol=1e-5)


def test_evaluation_transform_rejects_unknown_modes_and_crop_pct():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="crop_mode"):
        evaluation_transform(image, 32, 1.0, "border")
    with pytest.raises(ValueError, match="crop_pct"):
        evaluation_transform(image, 32, 1.2)


@pytest.mark.parametrize("shape, offset", [((256, 300), (16, 38)), ((301, 256), (38, 16))])
def test_seed_port_transform_is_a_plain_crop_when_no_resize_is_needed(shape, offset):
    # A shorter side of exactly floor(224 / 0.875) = 256 makes TensorFlow's bicubic resize the identity.
    image = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    top, left = offset
    np.testing.assert_array_equal(seed_port_transform(image, 224), image[top : top + 224, left : left + 224])


def test_seed_port_transform_resizes_the_shorter_side_to_256():
    image = np.tile(np.linspace(0, 255, 451, dtype=np.float32).astype(np.uint8)[None, :, None], (300, 1, 3))
    result = seed_port_transform(image, 224)
    assert result.shape == (224, 224, 3) and result.dtype == np.uint8
    # 451 x 300 -> round(451 * 256 / 300) = 385 x 256, crop from column (385 - 224) // 2 = 80 of a
    # horizontal ramp: the first kept column sits at 80.5 / 385 of the ramp.
    assert abs(int(result[0, 0, 0]) - 255 * 80.5 / 385) <= 2
    np.testing.assert_array_equal(result[0], result[-1])


def test_tensorflow_decoding_matches_pillow_on_lossless_files(tmp_path, rgb):
    path = _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(decode_like_tensorflow(path), rgb)
    with pytest.raises(ImageLoadError, match="not an image file"):
        decode_like_tensorflow(_write(tmp_path / "words.jpg", b"no pixels here"))
    with pytest.raises(ImageLoadError, match="no such file"):
        decode_like_tensorflow(tmp_path / "absent.png")
