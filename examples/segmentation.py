"""Semantic segmentation on a GC ViT backbone: stage features + a light FPN head.

`tfgcvit.feature_extractor(model)` returns the four stage outputs (strides 4, 8,
16, 32; channels C, 2C, 4C, 8C) of a GC ViT built with include_top=False. A
feature pyramid merges them top-down and predicts one class per pixel at
stride 4, upsampled to the image. The stem and the first stage are frozen
(`layer.trainable = False`), a common choice when fine-tuning a pretrained
backbone on little data. Any image size >= 32 works: the model is built for
(None, None, 3) and every upsampling resizes to the exact size of the map it
is added to.

Examples:
    python examples/segmentation.py --variant tiny --weights imagenet --image-size 512
    python examples/segmentation.py --variant mini --image-size 96 --steps 1   # smoke test
"""

import argparse

import keras
import numpy as np
from keras import layers, ops

import tfgcvit
from tfgcvit.model import get_constructor

MINI = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
            mlp_ratio=3)
FROZEN = ("patch_embed", "levels_0")


@keras.saving.register_keras_serializable(package="gcvit_examples")
class ResizeLike(layers.Layer):
    """Bilinearly resizes `x` to the height and width of `reference` (any sizes)."""

    def call(self, x, reference):
        return ops.image.resize(x, ops.shape(reference)[1:3], interpolation="bilinear")

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def build_backbone(variant, weights=None):
    """A headless GC ViT for images of any size."""
    options = dict(include_top=False, weights=weights, input_shape=(None, None, 3))
    if variant == "mini":
        return tfgcvit.GCViT(**MINI, model_name="gcvit_mini", **options)
    return get_constructor(variant)(**options)


def build_segmenter(backbone, num_classes, width=64, frozen=FROZEN):
    """FPN-lite: 1x1 laterals, top-down sums, a 3x3 conv, per-pixel logits at image size."""
    for name in frozen:
        backbone.get_layer(name).trainable = False
    features = tfgcvit.feature_extractor(backbone)
    images = features.inputs[0]
    maps = features(images)
    laterals = [layers.Conv2D(width, 1, name=f"lateral{i}")(maps[f"stage{i}"]) for i in range(4)]
    x = laterals[3]
    for i in (2, 1, 0):
        x = layers.Add(name=f"merge{i}")([laterals[i], ResizeLike(name=f"up{i}")(x, laterals[i])])
    x = layers.Conv2D(width, 3, padding="same", activation="gelu", name="fuse")(x)
    x = layers.Conv2D(num_classes, 1, name="classifier")(x)
    logits = layers.Activation("linear", dtype="float32", name="logits")(ResizeLike(name="to_image")(x, images))
    return keras.Model(images, logits, name="gcvit_fpn_segmenter")


def random_batch(batch_size, height, width, num_classes, seed=0):
    """Normalised random images and a blocky random mask (stand-ins for a dataset)."""
    rng = np.random.default_rng(seed)
    images = tfgcvit.preprocess_input(rng.integers(0, 256, (batch_size, height, width, 3)))
    coarse = rng.integers(0, num_classes, (batch_size, height // 8 + 1, width // 8 + 1))
    masks = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    return images, masks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="xxtiny", help="official variant or 'mini'")
    parser.add_argument("--weights", default=None, help="imagenet, a checkpoint path, or none")
    parser.add_argument("--image-size", type=int, nargs="+", default=[256, 320],
                        help="height [width]")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--run-eagerly", action="store_true", help="debugging, tiny runs")
    return parser.parse_args(argv)


def main(argv=None):
    """Builds the segmenter and trains it on random data; returns (model, history)."""
    args = parse_args(argv)
    height, width = (args.image_size * 2)[:2]
    weights = None if args.weights in (None, "none") else args.weights
    model = build_segmenter(build_backbone(args.variant, weights), args.classes)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=args.run_eagerly)
    images, masks = random_batch(args.batch_size * args.steps, height, width, args.classes)
    history = model.fit(images, masks, batch_size=args.batch_size, epochs=1, verbose=2)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    print(f"backend={keras.backend.backend()} output={tuple(model.output.shape)} "
          f"frozen parameters={frozen} loss={history.history['loss'][-1]:.4f}")
    return model, history


if __name__ == "__main__":
    main()
