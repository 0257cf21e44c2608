"""Int8 dynamic quantisation of ONNX files (`tfgcvit.export.quantize_onnx`): accuracy and speed.

Accuracy: the shared fixture model with its official weights, exported with
`export_model`, quantised with each setting; ONNX Runtime's logits against the
float32 file's on the 2 golden images and 6 standard-normal 224x224 images
(top-1 agreement, max logit drift, file size).

Speed (`--speed DIR`, with the GCViT-Tiny files that bench/onnx_export.py writes
into DIR): ours (`ours224fused-tiny.onnx`, what `export_model` writes) and timm's
(`timm-tiny.onnx`), each float32 and quantised with each setting, run in one
ONNX Runtime process, interleaved (bench/onnx_ab.py's loader), median per file.

Usage (from the repository root):
    .venv/bin/python bench/onnx_int8.py
    .venv/bin/python bench/onnx_int8.py --speed bench/out/onnx --rounds 15
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

# (label, op_types, per_channel); the first is quantize_onnx's default.
SETTINGS = [
    ("MatMul, per channel (default)", ("MatMul",), True),
    ("MatMul, per tensor", ("MatMul",), False),
    ("MatMul + Conv, per channel", ("MatMul", "Conv"), True),
    ("MatMul + Conv, per tensor", ("MatMul", "Conv"), False),
]


def accuracy(workdir):
    import onnxruntime

    from conftest import FIXTURE_CONFIG, FIXTURES
    from tfgcvit import GCViT
    from tfgcvit.export import export_model, quantize_onnx

    golden = np.load(FIXTURES / "custom_224_golden.npz")
    model = GCViT(**FIXTURE_CONFIG, weights=str(FIXTURES / "custom_224.pth.tar"))
    images = np.concatenate([
        golden["inputs"],
        np.random.default_rng(0).standard_normal((6, 224, 224, 3), dtype=np.float32),
    ])
    path = export_model(model, Path(workdir) / "fixture.onnx", format="onnx")

    def logits(file):
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]

    reference = logits(path)
    golden_count = len(golden["inputs"])
    print(f"fixture model, {len(images)} images (the first {golden_count} golden); "
          f"float32 file {os.path.getsize(path) / 1e6:.2f} MB, "
          f"max |ONNX - Keras| {np.max(np.abs(reference - model.predict(images, verbose=0))):.1e}, "
          f"largest logit {np.max(np.abs(reference)):.2f}")
    print("| quantised | file MB | top-1 agreement, golden / all | max logit drift, golden / all |")
    print("|---|---|---|---|")
    for label, op_types, per_channel in SETTINGS:
        out = Path(workdir) / "fixture-int8.onnx"
        quantize_onnx(path, out, per_channel=per_channel, op_types=op_types)
        output = logits(out)
        agree = output.argmax(-1) == reference.argmax(-1)
        drift = np.abs(output - reference).max(-1)
        print(f"| {label} | {os.path.getsize(out) / 1e6:.2f} | {agree[:golden_count].sum()}/{golden_count} / "
              f"{agree.sum()}/{len(images)} | {drift[:golden_count].max():.3f} / {drift.max():.3f} |")


def speed(directory, rounds, batches):
    import onnxruntime

    from onnx_ab import interleaved_times, load
    from tfgcvit.export import quantize_onnx

    files = {}
    for name in ("ours224fused", "timm"):
        source = Path(directory) / f"{name}-tiny.onnx"
        files[f"{name}, float32"] = source
        for label, op_types, per_channel in SETTINGS[:1] + SETTINGS[2:3]:
            target = Path(directory) / f"{name}-tiny-int8-{'-'.join(op_types).lower()}.onnx"
            quantize_onnx(source, target, per_channel=per_channel, op_types=op_types)
            files[f"{name}, int8 {label}"] = target
    print(f"onnxruntime {onnxruntime.__version__}, 2 threads, {rounds} interleaved rounds per batch size")
    print("| file | " + " | ".join(f"batch {b} ms (vs float32)" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    medians = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3), dtype=np.float32)
        runs = {label: load(str(path), "onnxruntime", 2, x) for label, path in files.items()}
        for run in runs.values():
            run()
        times = interleaved_times(runs, rounds)
        medians[batch] = {label: 1000 * float(np.median(t)) for label, t in times.items()}
        del runs
    for label in files:
        cells = []
        for batch in batches:
            base = medians[batch][label.split(",")[0] + ", float32"]
            cells.append(f"{medians[batch][label]:.1f} ({base / medians[batch][label]:.2f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", metavar="DIR", help="also time the GCViT-Tiny files in DIR")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if not args.no_accuracy:
        with tempfile.TemporaryDirectory() as workdir:
            accuracy(workdir)
    if args.speed:
        speed(args.speed, args.rounds, [int(b) for b in args.batches.split(",")])


if __name__ == "__main__":
    main()
