"""Export GC ViT for deployment and check every artifact against Keras.

Formats: ".keras" (Keras, any backend), TensorFlow SavedModel (TF Serving,
TensorFlow.js/other converters), ONNX (ONNX Runtime), TFLite/LiteRT (mobile).
The model is built for (None, None, 3), so every artifact takes any batch size
and any image size >= 32 (TFLite: resize the input tensor first). Each
artifact is reloaded in its own runtime and run on two batches of different
sizes; the script prints the largest difference from Keras and the file size.

Examples:
    python examples/export.py --variant tiny --weights imagenet --out exported/
    python examples/export.py --variant mini --formats keras tf_saved_model --out /tmp/x
"""

import argparse
import os

import keras
import numpy as np

import tfgcvit
from tfgcvit.export import BACKENDS, export_model
from tfgcvit.model.gcvit import get_constructor

MINI = dict(window_size=(7, 7, 14, 7), embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
            mlp_ratio=3, layer_scale=1e-5, classes=10)
FORMATS = ("keras", "tf_saved_model", "onnx", "litert")
FILE_NAMES = {"keras": "gcvit.keras", "tf_saved_model": "saved_model", "onnx": "gcvit.onnx",
              "litert": "gcvit.tflite"}


def build_model(variant, weights, depths=None):
    """A classifier for any image size, returning logits (no softmax: cheaper, exact argmax)."""
    options = dict(weights=weights, input_shape=(None, None, 3), classifier_activation=None)
    if variant == "mini":
        return tfgcvit.GCViT(**dict(MINI, depths=tuple(depths or MINI["depths"])), **options)
    return get_constructor(variant)(**options)


def size_of(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def tflite_interpreter(path):
    """LiteRT's interpreter (pip install ai-edge-litert), else TensorFlow's deprecated copy."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=path)


def run_artifact(format, path, images):
    """Loads an exported artifact in its runtime and runs one batch."""
    if format == "keras":
        model = keras.models.load_model(path)
        return keras.ops.convert_to_numpy(model(images, training=False))
    if format == "tf_saved_model":
        import tensorflow as tf

        served = tf.saved_model.load(path)  # keep a reference: it owns the variables
        return served.serve(images).numpy()
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    interpreter = tflite_interpreter(path)
    feed = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(feed["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(feed["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def export_and_check(model, out_dir, formats, samples):
    """Exports `model` to each format and compares each artifact with Keras on `samples`.

    Returns:
        {format: {"path": ..., "bytes": ..., "max_abs_diff": ...}}.
    """
    os.makedirs(out_dir, exist_ok=True)
    expected = [keras.ops.convert_to_numpy(model(images, training=False)) for images in samples]
    results = {}
    for format in formats:
        path = os.path.join(out_dir, FILE_NAMES[format])
        if format == "keras":
            model.save(path)
        else:
            export_model(model, path, format=format)
        diff = max(float(np.max(np.abs(run_artifact(format, path, images) - reference)))
                   for images, reference in zip(samples, expected))
        results[format] = {"path": path, "bytes": size_of(path), "max_abs_diff": diff}
        print(f"{format:15s} {size_of(path) / 1e6:8.2f} MB  max |diff| vs Keras {diff:.2e}  {path}")
    return results


def parse_args(argv=None):
    backend = keras.backend.backend()
    default = [f for f in FORMATS if f == "keras" or backend in BACKENDS[f]]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="xxtiny", help="official variant or 'mini'")
    parser.add_argument("--weights", default=None, help="imagenet, a checkpoint path, or none")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=default)
    parser.add_argument("--out", default="exported")
    parser.add_argument("--depths", type=int, nargs=4, default=None,
                        help="blocks per stage of the 'mini' architecture")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    weights = None if args.weights in (None, "none") else args.weights
    model = build_model(args.variant, weights, args.depths)
    rng = np.random.default_rng(0)
    # Two batches of different sizes exercise the dynamic dimensions.
    samples = [tfgcvit.preprocess_input(rng.integers(0, 256, shape)).astype("float32")
               for shape in ((2, 224, 224, 3), (1, 97, 131, 3))]
    return export_and_check(model, args.out, args.formats, samples)


if __name__ == "__main__":
    main()
