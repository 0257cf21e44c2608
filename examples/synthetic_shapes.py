"""Shared by examples/detection.py and examples/segmentation.py: a synthetic dataset and the GC ViT encoder.

The dataset: coloured rectangles, ellipses and triangles on textured noise
backgrounds, with a tight box, a class and a per-pixel mask for every shape.
A shape's class is its geometry only (colours are random), so a model has to
learn shapes, not colours. Shapes do not overlap, so every box is exactly the
extent of its visible mask.
"""

import numpy as np

from tfgcvit import preprocess_input
from tfgcvit.hub import GCViTBackbone, architecture, preset_name

CLASS_NAMES = ("rectangle", "ellipse", "triangle")
# A GC ViT small enough to train from scratch on 2 CPU cores in minutes.
MINI = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=(7, 7, 14, 7))


def textured_background(rng, height, width):
    """Smooth colour blobs (coarse noise upsampled) plus fine pixel noise."""
    coarse = rng.uniform(0, 255, (height // 16 + 2, width // 16 + 2, 3))
    smooth = coarse.repeat(16, axis=0).repeat(16, axis=1)[:height, :width]
    return 0.7 * smooth + rng.normal(0, 25, (height, width, 3))


def shape_mask(kind, top, left, size_y, size_x, height, width):
    """A boolean (height, width) mask of one shape filling the box (top, left, size_y, size_x)."""
    y, x = np.mgrid[:height, :width].astype("float32") + 0.5
    y, x = (y - top) / size_y, (x - left) / size_x  # box coordinates in [0, 1]
    inside = (y >= 0) & (y <= 1) & (x >= 0) & (x <= 1)
    if kind == "ellipse":
        return inside & ((2 * y - 1) ** 2 + (2 * x - 1) ** 2 <= 1)
    if kind == "triangle":  # apex at the top centre, base along the bottom edge
        return inside & (np.abs(2 * x - 1) <= y)
    return inside


def make_dataset(num_images, height, width, max_shapes=3, min_size=24, max_size=64, seed=0):
    """Random images with up to `max_shapes` non-overlapping shapes each.

    Args:
        num_images: images to draw.
        height, width: image size in pixels.
        max_shapes: most shapes per image (at least one each).
        min_size, max_size: range of a shape's box height and width in pixels.
        seed: random seed; the same seed gives the same dataset.

    Returns:
        A dict of numpy arrays:
        "images": (N, H, W, 3) uint8 RGB.
        "masks": (N, H, W) int32, 0 for background and 1 + class index for shapes.
        "boxes": (N, max_shapes, 4) float32 yxyx pixel boxes, padded with -1.
        "labels": (N, max_shapes) int32 class indices, padded with -1.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((num_images, height, width, 3), "uint8")
    masks = np.zeros((num_images, height, width), "int32")
    boxes = -np.ones((num_images, max_shapes, 4), "float32")
    labels = -np.ones((num_images, max_shapes), "int32")
    for i in range(num_images):
        image = textured_background(rng, height, width)
        placed = []
        for _ in range(rng.integers(1, max_shapes + 1)):
            size_y, size_x = rng.integers(min_size, max_size + 1, 2)
            top, left = rng.integers(0, height - size_y + 1), rng.integers(0, width - size_x + 1)
            box = (top, left, top + size_y, left + size_x)
            # Rejecting overlaps keeps every box equal to its shape's visible extent.
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                continue
            label = rng.integers(len(CLASS_NAMES))
            mask = shape_mask(CLASS_NAMES[label], top, left, size_y, size_x, height, width)
            image[mask] = rng.uniform(0, 255, 3)
            masks[i][mask] = label + 1
            rows, cols = np.nonzero(mask)
            boxes[i, len(placed)] = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
            labels[i, len(placed)] = label
            placed.append(box)
        images[i] = np.clip(image, 0, 255)
    return {"images": images, "masks": masks, "boxes": boxes, "labels": labels}


def normalize(images):
    """uint8 RGB -> what GCViTBackbone expects: (pixel / 255 - ImageNet mean) / std, float32."""
    return preprocess_input(images)


def build_image_encoder(variant="mini", weights=None, drop_path_rate=None):
    """A GCViTBackbone for any image size.

    Args:
        variant: "mini" (the small MINI config above) or an official variant ("tiny", ...).
        weights: None (random), "imagenet" / "imagenet21k" (the official checkpoint
            as a keras-hub preset, downloaded and converted on first use) or the
            path of a GC ViT preset directory.
        drop_path_rate: stochastic depth; None keeps the variant's default.
    """
    options = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    if weights in ("imagenet", "imagenet21k"):
        return GCViTBackbone.from_preset(preset_name(variant, weights), **options)
    if weights:
        return GCViTBackbone.from_preset(weights, **options)
    config = MINI if variant == "mini" else architecture(variant)
    return GCViTBackbone(**{**config, **options})


def train_and_test_data(args):
    """The training and held-out images that the common arguments ask for (different seeds)."""
    height, width = args.image_size
    train = make_dataset(args.train_images, height, width, seed=args.seed)
    test = make_dataset(args.test_images, height, width, seed=args.seed + 1)
    return train, test


def add_common_arguments(parser, image_size, epochs):
    """The command-line options both examples share."""
    parser.add_argument("--variant", default="mini",
                        help="'mini' (small, for a CPU) or an official variant, e.g. tiny")
    parser.add_argument("--weights", default=None,
                        help="imagenet, imagenet21k, a GC ViT preset directory, or none (random)")
    parser.add_argument("--image-size", type=int, nargs=2, default=image_size, metavar=("HEIGHT", "WIDTH"),
                        help="multiples of 32 (the keras-hub heads upsample by fixed factors)")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=epochs,
                        help="passes over the training images (train-images / batch-size steps each)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-eagerly", action="store_true",
                        help="no graph compilation: debugging, tiny runs")
