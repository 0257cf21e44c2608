"""Prints the measured numerical parity of tfgcvit against the official code and timm.

Usage (from the repository root, in the project venv):
    KERAS_BACKEND=tensorflow python bench/parity_report.py [--timm xxtiny,small,...]

Official: the shared golden fixture (logits and the four stage outputs of the
official PyTorch code in float32). timm: each configuration with weights
re-drawn at realistic magnitudes (see tests/test_parity_timm.py).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import FIXTURE_CONFIG, FIXTURES  # noqa: E402


def official_parity():
    import torch

    from tfgcvit import GCViT, feature_extractor, load_torch_weights

    golden = np.load(FIXTURES / "custom_224_golden.npz")
    checkpoint = torch.load(FIXTURES / "custom_224.pth.tar", map_location="cpu", weights_only=False)
    model = GCViT(**FIXTURE_CONFIG)
    load_torch_weights(model, {k: v.numpy() for k, v in checkpoint["state_dict"].items()})
    outputs = feature_extractor(model).predict(golden["inputs"], verbose=0)
    outputs["logits"] = model.predict(golden["inputs"], verbose=0)
    for name in ("logits", "stage0", "stage1", "stage2", "stage3"):
        diff = float(np.max(np.abs(outputs[name] - golden[name])))
        print(f"| official fixture | {name} | {diff:.2e} | {float(np.max(np.abs(golden[name]))):.2f} |")


def timm_parity(variants):
    import torch
    from test_parity_timm import TIMM_CONFIGS, build_timm

    from tfgcvit import load_torch_weights
    from tfgcvit.model.gcvit import CONSTRUCTORS

    for variant in variants:
        _, size, batch = TIMM_CONFIGS[variant]
        reference = build_timm(variant)
        images = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype("float32")
        with torch.no_grad():
            expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
        del reference
        model = CONSTRUCTORS[variant](weights=None, classifier_activation=None)
        load_torch_weights(model, state_dict)
        logits = model.predict(images, verbose=0)
        diff = float(np.max(np.abs(logits - expected)))
        print(f"| timm {variant} ({size}px) | logits | {diff:.2e} | {float(np.max(np.abs(expected))):.2f} |",
              flush=True)


def main():
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", default="", help="comma-separated variants to compare with timm")
    args = parser.parse_args()
    print(f"backend: {keras.backend.backend()}")
    print("| reference | output | max abs diff | max abs reference |")
    print("|---|---|---|---|")
    official_parity()
    if args.timm:
        timm_parity(args.timm.split(","))


if __name__ == "__main__":
    main()
