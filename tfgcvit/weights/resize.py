"""Resizing relative-position bias tables for other window sizes, in numpy.

A window attention layer with window w learns a bias table of shape
((2w - 1) ** 2, heads): one value per relative offset (dr, dc) in
[-(w - 1), w - 1] ** 2, per head. To reuse weights trained with one window
size in a model with another (e.g. 224 weights with windows 7/7/14/7 in a
384 model with windows 12/12/24/12), the table is viewed as a
(heads, 2w - 1, 2w - 1) image and resized bicubically, as the official GC ViT
detection backbone (and Swin) do when they load checkpoints:

    torch.nn.functional.interpolate(
        table.permute(1, 0).view(1, heads, S1, S1), size=(S2, S2), mode="bicubic")

`bicubic_resize` reproduces PyTorch's `mode="bicubic", align_corners=False`
(no antialiasing) exactly up to float rounding, without importing PyTorch.
"""

import math

import numpy as np

# PyTorch's (and OpenCV's) bicubic convolution constant.
CUBIC_A = -0.75


def _cubic_weights(t):
    """The four bicubic weights for taps at offsets -1, 0, 1, 2 of a fractional position t."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def bicubic_matrix(in_size, out_size):
    """The (out_size, in_size) matrix of a 1-D bicubic resize.

    Same sampling as PyTorch `interpolate(mode="bicubic", align_corners=False)`
    with an output size (not a scale factor): output pixel i reads the input at
    (i + 0.5) * in_size / out_size - 0.5; taps outside the input are clamped to
    the border pixel.

    Args:
        in_size: input length (>= 1).
        out_size: output length (>= 1).

    Returns:
        float64 array M with resized = M @ signal.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"Sizes must be positive; got in_size={in_size}, out_size={out_size}.")
    scale = in_size / out_size
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    left = np.floor(source)
    weights = _cubic_weights(source - left)  # (out, 4)
    taps = np.clip(left[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.repeat(np.arange(out_size), 4)
    # Border taps can repeat an index: accumulate rather than overwrite.
    np.add.at(matrix, (rows, taps.reshape(-1)), weights.reshape(-1))
    return matrix


def bicubic_resize(images, size):
    """Bicubic resize of the last two axes, like PyTorch on an NCHW tensor.

    Args:
        images: array (..., H, W).
        size: (out_height, out_width).

    Returns:
        Array (..., out_height, out_width) in the input's floating dtype
        (float32 for integer input). Computed in float64.
    """
    images = np.asarray(images)
    out_h, out_w = (int(s) for s in size)
    if images.ndim < 2:
        raise ValueError(f"bicubic_resize needs at least 2 dimensions; got shape {images.shape}.")
    rows = bicubic_matrix(images.shape[-2], out_h)
    cols = bicubic_matrix(images.shape[-1], out_w)
    result = rows @ images.astype(np.float64) @ cols.T
    dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32
    return result.astype(dtype)


def table_window_size(length):
    """The window size w whose bias table has `length` rows ((2w - 1) ** 2), or None."""
    side = math.isqrt(int(length))
    if side * side != length or side % 2 == 0:
        return None
    return (side + 1) // 2


def resize_bias_table(table, window_size):
    """Resizes a relative-position bias table to another window size.

    Args:
        table: array ((2w - 1) ** 2, heads) for the window size w it was
            trained with (Keras and official PyTorch share this layout).
        window_size: the new window size w'.

    Returns:
        Array ((2w' - 1) ** 2, heads) in the table's dtype; the table itself
        when w' == w.

    Raises:
        ValueError: the table is not 2-D, its length is not (2w - 1) ** 2, or
            the window size is not a positive integer.
    """
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"A bias table is 2-D ((2w-1)**2, heads); got shape {table.shape}.")
    old_window = table_window_size(table.shape[0])
    if old_window is None:
        raise ValueError(
            f"A bias table has (2w-1)**2 rows for a window size w; {table.shape[0]} rows is not one."
        )
    if int(window_size) != window_size or window_size < 1:
        raise ValueError(f"`window_size` must be a positive integer; got {window_size!r}.")
    window_size = int(window_size)
    if window_size == old_window:
        return table
    old_side, new_side = 2 * old_window - 1, 2 * window_size - 1
    heads = table.shape[1]
    # (L, heads) -> (heads, S, S), exactly the official permute(1, 0).view(...).
    grid = table.T.reshape(heads, old_side, old_side)
    grid = bicubic_resize(grid, (new_side, new_side))
    return grid.reshape(heads, new_side * new_side).T.astype(table.dtype)
