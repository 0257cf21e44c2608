"""Writes the two ONNX files that `compare_cpu.py --suite onnx` runs: ours and timm's.

- ours: this port's model on the TensorFlow backend, `input_shape=(None, None, 3)`,
  called once, then Keras' own `model.export(path, format="onnx")` (the call the
  README documents), NHWC input, dynamic batch, height and width; and
  `ours224-*.onnx`, the same at `input_shape=(224, 224, 3)` (dynamic batch only,
  what timm's file allows);
- `oursfused-*.onnx` / `ours224fused-*.onnx`: the same files rewritten by
  `tfgcvit.export.optimize_onnx` (layer norms fused, GELUs in ONNX Runtime's form, attention
  batch first, transposes cancelled), which is what
  `tfgcvit.export.export_model` (and `tfgcvit export`) writes;
- timm: `timm.create_model(...)` in eval mode through `torch.onnx.export` (the
  TorchScript exporter, opset 17), NCHW input, dynamic batch.

Both carry the same random weights (timm's initialisation, loaded into ours with
`tfgcvit.load_torch_weights`), and the two ONNX files are checked against each
other on one image with onnxruntime, so both runtimes are timed on the same function.

Usage: .venv/bin/python bench/onnx_export.py --model tiny --out bench/out/onnx
Prints one JSON line: the two paths, their sizes and the max |ours - timm| of the logits.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TIMM_NAMES = {"xxtiny": "gcvit_xxtiny", "xtiny": "gcvit_xtiny", "tiny": "gcvit_tiny",
              "small": "gcvit_small", "base": "gcvit_base"}


def export_timm(model_name, path):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[model_name], pretrained=False).eval()
    example = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


def export_ours(model_name, state_dict, path, input_shape=(None, None, 3)):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tfgcvit
    from tfgcvit.model import get_constructor

    model = get_constructor(model_name)(weights=None, input_shape=input_shape, classifier_activation=None)
    tfgcvit.load_torch_weights(model, state_dict)
    model(np.zeros((1, 224, 224, 3), np.float32))
    model.export(path, format="onnx", verbose=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(TIMM_NAMES))
    parser.add_argument("--out", default=os.path.join("bench", "out", "onnx"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ours = os.path.join(args.out, f"ours-{args.model}.onnx")
    ours_fixed = os.path.join(args.out, f"ours224-{args.model}.onnx")
    theirs = os.path.join(args.out, f"timm-{args.model}.onnx")
    # torch (and timm) first: importing them after TensorFlow crashes in this environment.
    state_dict = export_timm(args.model, theirs)
    export_ours(args.model, state_dict, ours)
    export_ours(args.model, state_dict, ours_fixed, input_shape=(224, 224, 3))
    # What `tfgcvit.export.export_model` writes: Keras' file through optimize_onnx.
    from tfgcvit.export import optimize_onnx

    fused = {path: os.path.join(args.out, f"{side}fused-{args.model}.onnx")
             for path, side in ((ours, "ours"), (ours_fixed, "ours224"))}
    for path, fused_path in fused.items():
        optimize_onnx(path, fused_path)

    import onnxruntime

    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3), dtype=np.float32)
    def run(path, inp):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: inp})[0]

    reference = run(theirs, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    report = {"timm": theirs, "timm_mb": os.path.getsize(theirs) / 1e6}
    for path in (ours, ours_fixed, *fused.values()):
        report[path] = {"mb": os.path.getsize(path) / 1e6,
                        "max_abs_logit_difference_to_timm": float(np.max(np.abs(run(path, x) - reference)))}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
