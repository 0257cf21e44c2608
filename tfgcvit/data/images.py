"""Image loading and the evaluation transforms of the official checkpoints.

`load_image` turns any file Pillow reads into an RGB uint8 array:

- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so photos from
  phones come out upright.
- Transparency (RGBA, LA, PA, palette or grayscale images with a transparent
  colour) is composited over a white background. Dropping the alpha channel
  instead, as `Image.convert("RGB")` does, would show whatever colour the
  transparent pixels happen to store, often black.
- 16-bit grayscale ("I;16", "I;16B", "I;16L") and 32-bit integer ("I") images
  are read as 16-bit data, the way Pillow opens 16-bit PNG and TIFF files, and
  scaled to 8 bits with value / 257 (0 -> 0, 65535 -> 255). Pillow's own
  conversion clips them at 255 instead, which turns most 16-bit images white.
  Values outside 0..65535 in an "I" image are clipped.
- Floating point ("F") images are taken to hold 0..255 and are rounded and
  clipped, as Pillow's own conversion does.
- 1-bit, grayscale, palette, CMYK, YCbCr, HSV and LAB images use Pillow's conversion.
- Multi-frame files (GIF, TIFF) give their first frame.
- Only regular files are read: a FIFO or /dev/stdin would block forever.

`evaluation_transform` is the test-time transform of timm, which the official
GC ViT code uses: bicubic resize of the shorter side to int(size / crop_pct),
then a centre crop of size x size ("center"), or a bicubic resize of both sides
to int(size / crop_pct) and the same centre crop ("squash", crop_pct 1.0 for
the 384 and 512 models). Resizing is done by Pillow, as in timm, but only for
the centre that the crop keeps (`resize_region`, same pixels): memory does not
grow with the aspect ratio (a 1 x 60000 image would otherwise take 12 GB).

`seed_port_transform` reproduces the ImageNet-v2 evaluation of the original
tfgcvit port (version 2.0.4) so that its published numbers can be compared like
for like; see its docstring.
"""

import functools
import io
import math
import os
import stat
from fractions import Fraction

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CROP_MODES = ("center", "squash")
# The original tfgcvit port evaluated with timm's default crop_pct.
SEED_PORT_CROP_PCT = 0.875
# The seed protocol resizes whole images: their memory grows with the aspect ratio.
SEED_PORT_MAX_ASPECT = 16

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """A file could not be read as an image; the message says why in one line."""


def _open_regular_file(path):
    """Opens `path` for binary reading, refusing anything but a regular file.

    Opening a FIFO for reading would wait for a writer forever (and a
    terminal or /dev/stdin for input), so the file is opened without blocking
    and checked before anything reads it.

    Args:
        path: the file to open.

    Returns:
        A binary file object.

    Raises:
        ImageLoadError: the path is missing, unreadable, a directory, or not a
            regular file.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:  # Windows; POSIX opens directories and fails fstat's check below.
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except OSError as error:  # permissions, symbolic link loops, ...
        raise ImageLoadError(f"{path}: cannot open the file ({error.strerror or error})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        if stat.S_ISDIR(mode):
            raise ImageLoadError(f"{path}: is a directory, not an image file")
        raise ImageLoadError(f"{path}: not a regular file (a pipe, device or socket); pass an image file")
    if nonblocking:
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def load_image(path, apply_exif=True):
    """Reads an image file into an RGB uint8 array.

    Args:
        path: path of any image file Pillow can read.
        apply_exif: rotate/flip the image as its EXIF orientation tag says.

    Returns:
        A uint8 numpy array (height, width, 3).

    Raises:
        ImageLoadError: the file is missing, is not a regular file, is not an
            image, is larger than Pillow's decompression-bomb limit, or cannot
            be decoded (corrupt data, or not enough memory).
    """
    with _open_regular_file(path) as file:
        try:
            with Image.open(file) as image:
                # Decode now, inside the `with`, so truncated files fail here.
                image.load()
                if apply_exif:
                    # In place: otherwise an image without orientation is copied whole.
                    ImageOps.exif_transpose(image, in_place=True)
                rgb = to_rgb(image)
            # Exported once the decoded original is freed: one Pillow copy fewer at the peak.
            return np.asarray(rgb)
        except UnidentifiedImageError:
            raise ImageLoadError(f"{path}: not an image file Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # The warning is an error where warnings are (the command line makes it one).
            raise ImageLoadError(f"{path}: {error}") from None
        except MemoryError:
            # Also Pillow's own limit: it cannot export rows wider than 2**31 bits (67 million RGB pixels).
            raise ImageLoadError(f"{path}: not enough memory to decode the image") from None
        except (OSError, ValueError, SyntaxError) as error:
            # Pillow reports truncated or corrupt data as OSError, SyntaxError or ValueError.
            raise ImageLoadError(f"{path}: cannot decode the image ({error})") from None


def to_rgb(image):
    """Converts a Pillow image of any mode to an 8-bit RGB Pillow image.

    See the module docstring for how each mode is handled.

    Args:
        image: a `PIL.Image.Image`.

    Returns:
        A `PIL.Image.Image` in mode "RGB".
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255)
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        if image.mode == "La":
            # Pillow converts premultiplied "La" only to "LA".
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _as_pil(image):
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"Expected an RGB uint8 array (height, width, 3) or a Pillow image; "
            f"got dtype {array.dtype} and shape {array.shape}."
        )
    return Image.fromarray(array, "RGB")


def scale_size(size, crop_pct):
    """The resize target before the centre crop, as timm computes it."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct}.")
    return math.floor(size / crop_pct)


def _shorter_side_size(width, height, size):
    # int() truncates the longer side, as torchvision's `Resize(int)` does.
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shorter_side(image, size):
    """Bicubic resize so that the shorter side is `size`, keeping the aspect ratio.

    The longer side is int(size * long / short), truncated, as torchvision's
    `Resize(int)` does.

    Args:
        image: a Pillow image or an RGB uint8 array.
        size: the new length of the shorter side.

    Returns:
        A Pillow image.
    """
    image = _as_pil(image)
    return image.resize(_shorter_side_size(*image.size, size), Image.Resampling.BICUBIC)


def _center_box(width, height, size):
    """(left, top, right, bottom) of the central size x size square, offsets rounded as torchvision does."""
    if width < size or height < size:
        raise ValueError(f"Cannot crop {size}x{size} from an image of {width}x{height}.")
    # Python's round() (half to even), exactly as torchvision's CenterCrop.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def center_crop(image, size):
    """Crops the central size x size square, rounding offsets as torchvision does.

    Args:
        image: a Pillow image or an RGB uint8 array, at least size x size.
        size: side of the crop.

    Returns:
        A Pillow image.
    """
    image = _as_pil(image)
    return image.crop(_center_box(*image.size, size))


# Pillow's bicubic filter reaches 2 source pixels either side of an output
# pixel's centre, times the scale factor when shrinking.
_BICUBIC_SUPPORT = 2.0
# How long a span of one axis of the resized image `_axis_plan` may compute to
# get the exact pixels: at least 4096 pixels, or 4 times what is kept. Memory
# is then at most about 4096 x 4096 x 4 bytes (64 MB) per image, and every
# image with an aspect ratio up to 16:1 (at 224 pixels) comes out exact.
_EXACT_SPAN = 4096


def _is_float32(value):
    # Pillow passes resize boxes to C as 32-bit floats.
    return Fraction(float(np.float32(value))) == value


def _axis_plan(source, resized, start, stop):
    """Which part of one axis of a resize to compute so that pixels start..stop come out as in the full resize.

    Pillow maps output pixel i of a resize from `source` to `resized` pixels to
    the source position (i + 0.5) * source / resized, also with a box, whose
    corners it takes as 32-bit floats. Computing only output pixels o0..o1
    therefore gives the same pixels as the full resize when o0 * source /
    resized and o1 * source / resized are exact 32-bit floats: o0 and o1 are
    multiples of the odd part of resized / gcd(source, resized) (1 for a 1 x N
    image, 3 for 451 x 300 -> 384 x 256). When those multiples lie further
    apart than `_EXACT_SPAN` (only for extreme aspect ratios), only
    start..stop is computed: memory stays bounded, and a few pixels in a
    thousand may differ from the full resize by a level or two (box corners
    rounded to float32).

    Args:
        source: length of the axis in the source image.
        resized: its length in the (virtual) full resize.
        start, stop: the output pixels wanted, 0 <= start < stop <= resized.

    Returns:
        (o0, o1, first, last, box0, box1): output pixels o0..o1 (covering
        start..stop) are computed from source pixels first..last, with the
        box box0..box1 relative to `first`.
    """
    scale = Fraction(source, resized)
    step = resized // math.gcd(source, resized)
    while step % 2 == 0:
        step //= 2
    o0, o1 = start // step * step, -(-stop // step) * step
    if o1 - o0 > max(_EXACT_SPAN, 4 * (stop - start)):
        o0, o1 = start, stop
    # Enough source pixels around the box for the whole filter: Pillow clips
    # the filter at the image border, so a cut any closer would change pixels.
    support = _BICUBIC_SUPPORT * max(float(scale), 1.0)
    first = max(0, math.floor(o0 * scale - support) - 1)
    last = min(source, math.ceil(o1 * scale + support) + 1)
    box0, box1 = o0 * scale - first, o1 * scale - first
    if not all(_is_float32(value) for value in (box0, box1, box1 - box0)):
        o0, o1 = start, stop
        box0, box1 = o0 * scale - first, o1 * scale - first
    return o0, o1, first, last, float(box0), float(box1)


@functools.lru_cache(maxsize=1)
def _pillow_shrinks_height_first():
    """Whether this Pillow runs the vertical pass first when the height shrinks most.

    Pillow resizes in two passes, each rounding to 8 bits. Older versions
    always run the horizontal pass first; recent ones (13 among them) run the
    vertical pass first when the height shrinks more than twice as much as the
    width. A 16 x 64 -> 12 x 16 probe tells which rule this Pillow follows.
    """
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 16, 3), dtype=np.uint8))
    full = probe.resize((12, 16), Image.Resampling.BICUBIC)
    height_first = probe.resize((16, 16), Image.Resampling.BICUBIC).resize((12, 16), Image.Resampling.BICUBIC)
    return np.array_equal(np.asarray(full), np.asarray(height_first))


def resize_region(image, new_size, region):
    """Pixels `region` of `image.resize(new_size, BICUBIC)`, computing only what they need.

    Memory is bounded by the region's size, not by `new_size`: a 1 x 60000
    image "resized" to 256 x 15360000 costs no more than a photo. On each axis
    the pixels equal those of the full resize (see `_axis_plan` for the
    extreme aspect ratios where a few may differ by a level or two).

    Args:
        image: a Pillow image (8-bit mode, e.g. "RGB").
        new_size: (width, height) of the full resize.
        region: (left, top, right, bottom) in the resized image.

    Returns:
        A Pillow image of the region's size.
    """
    width, height = image.size
    new_width, new_height = new_size
    left, top, right, bottom = region
    x0, x1, first_x, last_x, box_x0, box_x1 = _axis_plan(width, new_width, left, right)
    y0, y1, first_y, last_y, box_y0, box_y1 = _axis_plan(height, new_height, top, bottom)
    image = image.crop((first_x, first_y, last_x, last_y))

    def horizontal(image):
        return image.resize((x1 - x0, image.height), Image.Resampling.BICUBIC, box=(box_x0, 0, box_x1, image.height))

    def vertical(image):
        return image.resize((image.width, y1 - y0), Image.Resampling.BICUBIC, box=(0, box_y0, image.width, box_y1))

    # The two passes in the order Pillow's full resize would run them: each
    # rounds to 8 bits, so the order changes pixels.
    shrink = height - new_height
    if _pillow_shrinks_height_first() and shrink > 0 and shrink > 2 * (width - new_width):
        image = horizontal(vertical(image))
    else:
        image = vertical(horizontal(image))
    return image.crop((left - x0, top - y0, right - x0, bottom - y0))


def evaluation_transform(image, size, crop_pct=SEED_PORT_CROP_PCT, crop_mode="center"):
    """The test-time transform of a checkpoint: resize, centre crop, as uint8 RGB.

    Only the kept centre is resized (`resize_region`), so memory does not grow
    with the aspect ratio; the pixels are those of timm's full resize and crop.

    Args:
        image: a Pillow image or an RGB uint8 array.
        size: the model input size (224, 384, 512, ...).
        crop_pct: fraction of the resized image kept by the crop, in (0, 1].
        crop_mode: "center" resizes the shorter side, keeping the aspect
            ratio; "squash" resizes both sides, changing it.

    Returns:
        A uint8 array (size, size, 3), ready for `tfgcvit.preprocess_input`.
    """
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}; got {crop_mode!r}.")
    image = _as_pil(image)
    resized_size = scale_size(size, crop_pct)
    if crop_mode == "squash":
        new_size = (resized_size, resized_size)
    else:
        new_size = _shorter_side_size(*image.size, resized_size)
    return np.asarray(resize_region(image, new_size, _center_box(*new_size, size)))


def decode_like_tensorflow(path):
    """Decodes an image file with TensorFlow, as `tensorflow_datasets` does.

    The original port was evaluated on `tfds` ImageNet-v2, whose images are
    decoded by `tf.image.decode_image(..., channels=3)`; TensorFlow's JPEG
    decoder settings differ from Pillow's, so reproducing that evaluation on a
    folder of JPEG files decodes them the same way.

    Args:
        path: an image file (JPEG, PNG, GIF or BMP).

    Returns:
        A uint8 array (height, width, 3).

    Raises:
        ImageLoadError: the file is missing or not a regular file, has more
            pixels than Pillow's decompression-bomb limit, or TensorFlow
            cannot decode it.
    """
    import tensorflow as tf

    with _open_regular_file(path) as file:
        data = file.read()
    try:
        # The header alone: TensorFlow's decoder has no pixel limit of its own.
        Image.open(io.BytesIO(data)).close()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"{path}: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass  # TensorFlow may still read it; if not, it says so below.
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError):
        raise ImageLoadError(f"{path}: not an image file TensorFlow can decode") from None
    return image.numpy()


def seed_port_transform(image, size=224):
    """The ImageNet-v2 evaluation preprocessing of the original tfgcvit port.

    tfgcvit 2.0.4's README (the one that publishes Tiny 73.01/72.93 and Small
    73.39/73.46 top-1) prepares each image with TensorFlow:

    1. scale = floor(size / 0.875) = 256 for size 224;
    2. the shorter side goes to `scale`, the longer one to round(long * scale / short)
       (float32 arithmetic), with `tf.image.resize(..., method="bicubic")`:
       Keys cubic, no antialiasing, unlike Pillow;
    3. round, clip to [0, 255], cast to uint8;
    4. crop size x size starting at ((height - size) // 2, (width - size) // 2).

    An earlier version of that README, without published numbers, squashed
    to 292 x 292 (int(256 / 224 * 256)) and applied
    `tf.image.central_crop(image, 224 / 256)`, which keeps 256 x 256 pixels
    (offset int((292 - 292 * 0.875) / 2) = 18 on each side): that is not what
    produced the published figures and is not reproduced here.

    Unlike `evaluation_transform`, this resizes the whole image, so it
    refuses aspect ratios beyond `SEED_PORT_MAX_ASPECT` (a 1 x 60000 image
    would need 15 GB); ImageNet-v2's photos are far from it.

    Args:
        image: an RGB uint8 array (height, width, 3).
        size: the model input size.

    Returns:
        A uint8 array (size, size, 3).

    Raises:
        ValueError: the aspect ratio is beyond `SEED_PORT_MAX_ASPECT`.
    """
    import tensorflow as tf

    height, width = np.shape(image)[:2]
    if max(height, width) > SEED_PORT_MAX_ASPECT * min(height, width):
        raise ValueError(
            f"{width}x{height} pixels: an aspect ratio beyond {SEED_PORT_MAX_ASPECT}:1, which the "
            "seed protocol's full-image resize cannot hold in memory; use --protocol official"
        )
    target = math.floor(size / SEED_PORT_CROP_PCT)
    shape = tf.cast(tf.shape(image)[:2], "float32")
    shape = tf.cast(tf.round(shape * (target / tf.reduce_min(shape))), "int32")
    resized = tf.image.resize(image, shape, method=tf.image.ResizeMethod.BICUBIC)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), "uint8")
    top, left = [int(v) for v in ((shape - size) // 2).numpy()]
    return resized[top : top + size, left : left + size].numpy()
