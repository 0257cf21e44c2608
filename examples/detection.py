"""Object detection with keras-hub's RetinaNet on a GC ViT backbone, on synthetic shapes.

`keras_hub.models.RetinaNetBackbone` adds a feature pyramid (P3..P7) to the
GC ViT stage outputs P3..P5 (strides 8, 16, 32);
`keras_hub.models.RetinaNetObjectDetector` adds the box and class heads, the
anchor matching and focal loss for `fit`, and box decoding with non-max
suppression in `predict`. The script trains on random rectangles, ellipses and
triangles (examples/synthetic_shapes.py) and reports mAP@0.5 on held-out images.

Image sides must be multiples of 32: the feature pyramid upsamples each level
by exactly 2 before adding it to the next one.

Examples:
    python examples/detection.py --epochs 10                             # mini GC ViT, CPU
    python examples/detection.py --variant tiny --weights imagenet --image-size 512 512
"""

import argparse
import time

import keras
import keras_hub
import numpy as np

import synthetic_shapes


def build_detector(image_encoder, num_classes, head_layers=2):
    """RetinaNet (FPN P3..P7, box and class heads) on a GCViTBackbone.

    Args:
        image_encoder: a GCViTBackbone.
        num_classes: object classes (no background class).
        head_layers: 3x3 convolutions of 256 channels in each head before its
            output layer (4 in the RetinaNet paper; 2 trains faster on a CPU).
    """
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=image_encoder, min_level=3, max_level=7, use_p5=False)
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=num_classes,
        bounding_box_format="yxyx",  # what synthetic_shapes returns, in pixels
        pre_logits_num_conv_layers=head_layers,
        # A low confidence threshold keeps the low-scoring detections that mAP counts.
        prediction_decoder=keras_hub.layers.NonMaxSuppression(
            bounding_box_format="yxyx", from_logits=True, confidence_threshold=0.05, max_detections=20),
    )


def box_iou(box, boxes):
    """IoU of one yxyx box with each of `boxes` (K, 4)."""
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return intersection / (area + areas - intersection)


def average_precision(scores, hits, num_truths):
    """Area under the precision-recall curve (all points, precision made monotone as in VOC/COCO)."""
    if num_truths == 0:
        return float("nan")
    hits = np.asarray(hits, "float64")[np.argsort(-np.asarray(scores))]
    true_positives = np.cumsum(hits)
    recall = np.concatenate([[0.0], true_positives / num_truths])
    precision = true_positives / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision))


def mean_average_precision(predictions, boxes, labels, num_classes, iou_threshold=0.5):
    """mAP at one IoU threshold (PASCAL VOC's mAP@0.5 by default), averaged over classes.

    Args:
        predictions: `RetinaNetObjectDetector.predict` output ("boxes", "confidence",
            "labels", "num_detections").
        boxes, labels: the true yxyx boxes (N, K, 4) and classes (N, K), padded with -1.
        num_classes: classes to average over (those without true boxes are left out).
        iou_threshold: IoU a detection needs with an unmatched true box of its class.
    """
    precisions = []
    for label in range(num_classes):
        scores, hits, num_truths = [], [], 0
        for i in range(len(boxes)):
            truth = boxes[i][labels[i] == label]
            num_truths += len(truth)
            count = int(predictions["num_detections"][i])
            mine = predictions["labels"][i][:count] == label
            found = predictions["boxes"][i][:count][mine]
            confidence = predictions["confidence"][i][:count][mine]
            matched = np.zeros(len(truth), bool)
            # Each true box counts once: the most confident detection that overlaps it.
            for j in np.argsort(-confidence):
                ious = np.where(matched, -1.0, box_iou(found[j], truth)) if len(truth) else np.zeros(0)
                best = int(np.argmax(ious)) if len(ious) else -1
                hit = best >= 0 and ious[best] >= iou_threshold
                if hit:
                    matched[best] = True
                scores.append(confidence[j])
                hits.append(hit)
        precisions.append(average_precision(scores, hits, num_truths))
    return float(np.nanmean(precisions))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    synthetic_shapes.add_common_arguments(parser, image_size=[128, 128], epochs=10)
    parser.add_argument("--head-layers", type=int, default=2, help="convolutions per head (4 in the paper)")
    return parser.parse_args(argv)


def main(argv=None):
    """Trains RetinaNet on GC ViT on synthetic shapes; returns a dict with the model, history and mAP@0.5."""
    args = parse_args(argv)
    train, test = synthetic_shapes.train_and_test_data(args)
    num_classes = len(synthetic_shapes.CLASS_NAMES)

    encoder = synthetic_shapes.build_image_encoder(args.variant, args.weights)
    detector = build_detector(encoder, num_classes, args.head_layers)
    # The default losses: focal loss on the classes, Huber on the box offsets.
    detector.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, clipnorm=1.0),
                     run_eagerly=args.run_eagerly)

    start = time.time()
    targets = {"boxes": train["boxes"], "labels": train["labels"]}  # padded with -1: no object
    history = detector.fit(synthetic_shapes.normalize(train["images"]), targets, batch_size=args.batch_size,
                           epochs=args.epochs, verbose=2)
    seconds = time.time() - start
    steps = args.epochs * -(-args.train_images // args.batch_size)

    predictions = detector.predict(synthetic_shapes.normalize(test["images"]), batch_size=args.batch_size,
                                   verbose=0)
    map50 = mean_average_precision(predictions, test["boxes"], test["labels"], num_classes)
    print(f"backend={keras.backend.backend()} steps={steps} train_seconds={seconds:.0f} "
          f"loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f} "
          f"held-out mAP@0.5={map50:.3f} ({args.test_images} images)")
    return {"model": detector, "history": history, "map50": map50, "train_seconds": seconds}


if __name__ == "__main__":
    main()
