"""This port on the PyTorch backend against timm eager, in one process.

GCViT-Tiny (random weights) through `model.predict_on_batch`, as users call it,
against timm's `gcvit_tiny` under `torch.no_grad`, alternating call by call, so
machine drift hits both alike; medians and minima. `--only ours` runs ours alone
(for a profiler, e.g. `py-spy record -r 200 -f raw -- .venv/bin/python
bench/torch_timm_ab.py --only ours --rounds 150`).

Usage: .venv/bin/python bench/torch_timm_ab.py --batch 1 --rounds 25
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfgcvit.model import get_constructor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("ours",), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    model = get_constructor("tiny")(weights=None)
    sides = {"ours (Keras PyTorch)": lambda: model.predict_on_batch(x)}
    if args.only is None:
        import timm

        reference = timm.create_model("gcvit_tiny", pretrained=False).eval()
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def theirs():
            with torch.no_grad():
                reference(images)

        sides["timm eager"] = theirs
    for run in sides.values():
        run(), run()
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"GCViT-Tiny, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds")
    for name, values in times.items():
        print(f"  {name:22s} median {1000 * np.median(values):7.1f} ms   min {1000 * min(values):7.1f} ms")
    if len(times) == 2:
        ours, theirs_ = (np.median(values) for values in times.values())
        print(f"  ours / timm: {ours / theirs_:.2f}x")


if __name__ == "__main__":
    main()
