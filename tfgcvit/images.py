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

`evaluation_transform` is the test-time transform of timm, which the official
GC ViT code uses: bicubic resize of the shorter side to int(size / crop_pct),
then a centre crop of size x size ("center"), or a bicubic resize of both sides
to int(size / crop_pct) and the same centre crop ("squash", crop_pct 1.0 for
the 384 and 512 models). Resizing is done by Pillow, as in timm.

`seed_port_transform` reproduces the ImageNet-v2 evaluation of the original
tfgcvit port (version 2.0.4) so that its published numbers can be compared like
for like; see its docstring.
"""

import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CROP_MODES = ("center", "squash")
# The original tfgcvit port evaluated with timm's default crop_pct.
SEED_PORT_CROP_PCT = 0.875

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """A file could not be read as an image; the message says why in one line."""


def load_image(path, apply_exif=True):
    """Reads an image file into an RGB uint8 array.

    Args:
        path: path of any image file Pillow can read.
        apply_exif: rotate/flip the image as its EXIF orientation tag says.

    Returns:
        A uint8 numpy array (height, width, 3).

    Raises:
        ImageLoadError: the file is missing, is not an image, or cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            # Decode now, inside the `with`, so truncated files fail here.
            image.load()
            if apply_exif:
                image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image))
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path}: {error}") from None
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
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image, size):
    """Crops the central size x size square, rounding offsets as torchvision does.

    Args:
        image: a Pillow image or an RGB uint8 array, at least size x size.
        size: side of the crop.

    Returns:
        A Pillow image.
    """
    image = _as_pil(image)
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"Cannot crop {size}x{size} from an image of {width}x{height}.")
    # Python's round() (half to even), exactly as torchvision's CenterCrop.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def evaluation_transform(image, size, crop_pct=SEED_PORT_CROP_PCT, crop_mode="center"):
    """The test-time transform of a checkpoint: resize, centre crop, as uint8 RGB.

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
    resized_size = scale_size(size, crop_pct)
    if crop_mode == "squash":
        image = _as_pil(image).resize((resized_size, resized_size), Image.Resampling.BICUBIC)
    else:
        image = resize_shorter_side(image, resized_size)
    return np.asarray(center_crop(image, size))


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
        ImageLoadError: the file is missing or TensorFlow cannot decode it.
    """
    import tensorflow as tf

    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
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

    Args:
        image: an RGB uint8 array (height, width, 3).
        size: the model input size.

    Returns:
        A uint8 array (size, size, 3).
    """
    import tensorflow as tf

    target = math.floor(size / SEED_PORT_CROP_PCT)
    shape = tf.cast(tf.shape(image)[:2], "float32")
    shape = tf.cast(tf.round(shape * (target / tf.reduce_min(shape))), "int32")
    resized = tf.image.resize(image, shape, method=tf.image.ResizeMethod.BICUBIC)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), "uint8")
    top, left = [int(v) for v in ((shape - size) // 2).numpy()]
    return resized[top : top + size, left : left + size].numpy()
