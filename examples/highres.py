"""Run GC ViT at a higher resolution with larger windows, starting from 224 weights.

The official ImageNet-21k models at 384 and 512 use windows 12/12/24/12 and
16/16/32/16 instead of 7/7/14/7, so that every stage is a whole number of
windows and the global query generator lands exactly on the window size. Any
variant can be built that way; its 224 weights load unchanged except the
relative-position bias tables, which `load_torch_weights` resizes bicubically
(as the official detection backbone does). Fine-tune briefly at the new
resolution before relying on the predictions.

Examples:
    python examples/highres.py --variant tiny --weights imagenet --size 384
    python examples/highres.py --variant mini --weights tests/data/fixtures/custom_224.pth.tar --size 192
"""

import argparse

import keras
import numpy as np

import tfgcvit
from tfgcvit.model.gcvit import VARIANTS, get_constructor

# The architecture of the repository's test checkpoint (tests/data/fixtures/custom_224.pth.tar).
MINI = dict(embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8), mlp_ratio=3,
            layer_scale=1e-5, classes=10)


def windows_for(size):
    """Windows that tile a size x size input exactly: size // (32, 32, 16, 32), as timm derives them.

    224 -> (7, 7, 14, 7), 384 -> (12, 12, 24, 12), 512 -> (16, 16, 32, 16).
    """
    if size % 32:
        raise ValueError(f"Use a multiple of 32 for exact windows; got {size}.")
    return (size // 32, size // 32, size // 16, size // 32)


def read_state_dict(variant, weights):
    """The 224 weights as a PyTorch-layout state dict (official names)."""
    if weights in ("imagenet", "imagenet21k"):
        from tfgcvit.weights.pretrained import pretrained_state_dict

        return pretrained_state_dict(variant, weights)
    from tfgcvit.weights.checkpoint import read_checkpoint

    return read_checkpoint(weights)


def build_highres(variant, size, weights):
    """A model at size x size with matching windows, loaded from 224 weights."""
    windows = windows_for(size)
    options = dict(weights=None, input_shape=(size, size, 3), window_size=windows)
    if variant == "mini":
        model = tfgcvit.GCViT(**MINI, **options)
    else:
        model = get_constructor(variant)(**options)
    # Bias tables of shape ((2w-1)^2, heads) are resized to the new windows.
    tfgcvit.load_torch_weights(model, read_state_dict(variant, weights))
    return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help=f"one of {', '.join(VARIANTS)} or 'mini'")
    parser.add_argument("--weights", default="imagenet", help="imagenet or a 224 checkpoint path")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--images", nargs="*", help="image files to classify (default: noise)")
    return parser.parse_args(argv)


def main(argv=None):
    """Builds the high-resolution model and runs it once; returns (model, outputs)."""
    args = parse_args(argv)
    model = build_highres(args.variant, args.size, args.weights)
    if args.images:
        from tfgcvit.data.images import evaluation_transform, load_image

        # The official 384/512 models squash the whole image to size x size.
        pixels = np.stack([evaluation_transform(load_image(path), args.size, crop_pct=1.0,
                                                crop_mode="squash") for path in args.images])
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (1, args.size, args.size, 3))
    outputs = keras.ops.convert_to_numpy(model(tfgcvit.preprocess_input(pixels), training=False))
    windows = [model.get_layer(f"levels_{i}").window_size for i in range(4)]
    print(f"{model.name}: input {args.size}x{args.size}, windows {windows}, "
          f"output {outputs.shape}, top class per image {outputs.argmax(-1).tolist()}")
    return model, outputs


if __name__ == "__main__":
    main()
