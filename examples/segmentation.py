"""Semantic segmentation with keras-hub's DeepLabV3+ on a GC ViT backbone, on synthetic shapes.

`keras_hub.models.DeepLabV3Backbone` applies atrous spatial pyramid pooling to
the GC ViT stage output P5 (stride 32), upsamples it 8x and concatenates the
projected P2 features (stride 4, the DeepLabV3+ decoder);
`keras_hub.models.DeepLabV3ImageSegmenter` adds the per-pixel class logits at
image size. The script trains on random rectangles, ellipses and triangles
(examples/synthetic_shapes.py; classes background + 3 shapes) and reports the
mean IoU on held-out images.

Image sides must be multiples of 32: P5 upsampled 8x must match P2, and the
output is P2 upsampled 4x.

Examples:
    python examples/segmentation.py --epochs 10                             # mini GC ViT, CPU
    python examples/segmentation.py --variant tiny --weights imagenet --image-size 512 512
"""

import argparse
import time

import keras
import keras_hub
import numpy as np

import synthetic_shapes


def build_segmenter(image_encoder, num_classes, dilation_rates=(2, 4, 6)):
    """DeepLabV3+ (ASPP on P5, decoder on P2) on a GCViTBackbone.

    Args:
        image_encoder: a GCViTBackbone.
        num_classes: classes including the background.
        dilation_rates: of the ASPP branches. P5 is only 1/32 of the image, so
            these are smaller than the usual (6, 12, 18), which are meant for
            stride 16 maps of 512 px images.
    """
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=image_encoder,
        spatial_pyramid_pooling_key="P5",
        upsampling_size=8,  # P5 (stride 32) -> stride 4, the size of P2
        dilation_rates=list(dilation_rates),
        low_level_feature_key="P2",
        projection_filters=48,
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=num_classes)


def mean_iou(truth, predicted, num_classes):
    """Mean over classes of |truth & predicted| / |truth | predicted| (classes absent from both left out)."""
    confusion = np.bincount(truth.ravel() * num_classes + predicted.ravel(),
                            minlength=num_classes**2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return float(np.mean(intersection[union > 0] / union[union > 0]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    synthetic_shapes.add_common_arguments(parser, image_size=[128, 128], epochs=10)
    return parser.parse_args(argv)


def main(argv=None):
    """Trains DeepLabV3+ on GC ViT on synthetic shapes; returns a dict with the model, history and mIoU."""
    args = parse_args(argv)
    train, test = synthetic_shapes.train_and_test_data(args)
    num_classes = 1 + len(synthetic_shapes.CLASS_NAMES)

    encoder = synthetic_shapes.build_image_encoder(args.variant, args.weights)
    segmenter = build_segmenter(encoder, num_classes)
    # The masks hold class indices; keras-hub's default loss and metric expect one-hot masks.
    segmenter.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, clipnorm=1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy()], run_eagerly=args.run_eagerly)

    start = time.time()
    history = segmenter.fit(synthetic_shapes.normalize(train["images"]), train["masks"],
                            batch_size=args.batch_size, epochs=args.epochs, verbose=2)
    seconds = time.time() - start
    steps = args.epochs * -(-args.train_images // args.batch_size)

    logits = segmenter.predict(synthetic_shapes.normalize(test["images"]), batch_size=args.batch_size,
                               verbose=0)
    miou = mean_iou(test["masks"], np.argmax(logits, axis=-1), num_classes)
    print(f"backend={keras.backend.backend()} steps={steps} train_seconds={seconds:.0f} "
          f"loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f} "
          f"held-out mIoU={miou:.3f} ({args.test_images} images, {num_classes} classes)")
    return {"model": segmenter, "history": history, "miou": miou, "train_seconds": seconds}


if __name__ == "__main__":
    main()
