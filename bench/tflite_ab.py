"""TFLite files side by side in one LiteRT interpreter process: ours and the original port's.

There is no TFLite file of timm's model without a third converter (PyTorch to
TFLite), so the peer here is the original port (tfgcvit 2.0.4), converted by
its own TensorFlow 2.12 with `tf.lite.TFLiteConverter.from_keras_model`, the
way its users would.

Steps (from the repository root):
    # 1. the original port's files, float32 and int8 (dynamic range), in its venv
    .venv-seed/bin/python bench/tflite_ab.py write-seed --out bench/out/tflite
    # 2. ours through `tfgcvit.export.export_model(..., format="litert")`: fixed
    #    224x224 and any height and width, each float32 and int8
    .venv/bin/python bench/tflite_ab.py write-ours --out bench/out/tflite
    # 3. all files in one process, interleaved, median per file
    .venv/bin/python bench/tflite_ab.py time --batch 1 --rounds 20 bench/out/tflite/*.tflite
    # int8 accuracy: the fixture model with its official weights, float32 and
    # int8 files against Keras on the 2 golden and 6 standard-normal images
    .venv/bin/python bench/tflite_ab.py accuracy --out bench/out/tflite

Each model carries its own random weights (GCViT-Tiny, seed 0): the timings
compare the graphs, not the outputs. int8 means TFLite's dynamic-range
quantisation (`optimizations=[tf.lite.Optimize.DEFAULT]`): int8 weights, float
activations. LiteRT runs float files on its default XNNPACK delegate.
"""

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_seed(out):
    import tensorflow as tf
    import tfgcvit

    tf.keras.utils.set_random_seed(0)
    model = tfgcvit.GCViTTiny(weights=None, input_shape=(224, 224, 3))
    for int8 in (False, True):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        path = os.path.join(out, f"seed-tiny{'-int8' if int8 else ''}.tflite")
        with open(path, "wb") as file:
            file.write(converter.convert())
        print(path, os.path.getsize(path))


def write_ours(out):
    sys.path.insert(0, REPO)
    import keras
    import tensorflow as tf

    from tfgcvit import GCViTTiny
    from tfgcvit.export import export_model

    for label, shape in (("224", (224, 224, 3)), ("any", (None, None, 3))):
        keras.utils.set_random_seed(0)
        model = GCViTTiny(weights=None, input_shape=shape)
        for int8 in (False, True):
            options = {"optimizations": [tf.lite.Optimize.DEFAULT]} if int8 else {}
            path = os.path.join(out, f"ours{label}-tiny{'-int8' if int8 else ''}.tflite")
            export_model(model, path, format="litert", **options)
            print(path, os.path.getsize(path))


def accuracy(out):
    """The fixture model with its official weights: TFLite float32 and int8 against Keras."""
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import FIXTURE_CONFIG, FIXTURES  # before TensorFlow, as in the tests

    import tensorflow as tf

    from tfgcvit import GCViT
    from tfgcvit.export import export_model

    golden = np.load(FIXTURES / "custom_224_golden.npz")
    model = GCViT(**FIXTURE_CONFIG, weights=str(FIXTURES / "custom_224.pth.tar"))
    images = np.concatenate([
        golden["inputs"],
        np.random.default_rng(0).standard_normal((6, 224, 224, 3), dtype=np.float32),
    ])
    reference = np.asarray(model.predict_on_batch(images))
    print(f"fixture model, {len(images)} images (the first {len(golden['inputs'])} golden); "
          f"Keras logits up to {np.abs(reference).max():.2f} in size, "
          f"golden logits reproduced to {np.abs(reference[:2] - golden['logits']).max():.1e}")
    for int8 in (False, True):
        path = os.path.join(out, f"fixture{'-int8' if int8 else ''}.tflite")
        options = {"optimizations": [tf.lite.Optimize.DEFAULT]} if int8 else {}
        export_model(model, path, format="litert", **options)
        logits = load(path, images, threads=2)()
        agree = int(np.sum(logits.argmax(-1) == reference.argmax(-1)))
        print(f"  {'int8 (dynamic range)' if int8 else 'float32':22s} top-1 agrees on {agree}/{len(images)}, "
              f"max |logit - Keras| {np.abs(logits - reference).max():.1e}, "
              f"{os.path.getsize(path) / 1e6:.2f} MB")


def load(path, x, threads):
    """A function that runs the TFLite file at PATH on X (NHWC)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    feed = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(feed["index"], list(x.shape))
    interpreter.allocate_tensors()
    output = interpreter.get_output_details()[0]["index"]

    def run():
        interpreter.set_tensor(feed["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(output)

    return run


def time_files(files, batch, rounds, threads):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from onnx_ab import interleaved_times

    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3), dtype=np.float32)
    runs = {path: load(path, x, threads) for path in files}
    for run in runs.values():  # first call: allocation and delegate set-up
        run()
    times = interleaved_times(runs, rounds)
    import ai_edge_litert

    print(f"LiteRT {ai_edge_litert.__version__}, batch {batch}, {threads} threads, {rounds} interleaved rounds")
    for path in files:
        print(f"  {os.path.basename(path):28s} median {1000 * np.median(times[path]):7.1f} ms   "
              f"({os.path.getsize(path) / 1e6:.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("write-seed", "write-ours", "time", "accuracy"))
    parser.add_argument("files", nargs="*")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out", "tflite"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_intermixed_args()
    if args.step == "time":
        time_files(args.files, args.batch, args.rounds, args.threads)
        return
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    {"write-seed": write_seed, "write-ours": write_ours, "accuracy": accuracy}[args.step](args.out)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
