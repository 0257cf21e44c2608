"""XLA's CPU depthwise convolution against nine shifted multiply-adds, at GC ViT's shapes.

The evidence for `tfgcvit.model.layers._conv` on JAX: the 3x3
depthwise convolutions of GC ViT's MBConv blocks (stem, global-query
generators, downsamples) through `jax.lax.conv_general_dilated` with
`feature_group_count=channels` (what Keras' `DepthwiseConv2D` calls on JAX)
and written as shifted slices times the kernel taps, each jitted alone.

Usage (from the repository root):
    .venv/bin/python bench/depthwise.py
"""

import argparse
import time

import numpy as np

# (batch, height, width, channels) of GCViT-Tiny's MBConv inputs at 224x224.
SHAPES = [(8, 112, 112, 64), (8, 56, 56, 64), (8, 28, 28, 128), (8, 14, 14, 256), (8, 7, 7, 512),
          (1, 112, 112, 64), (1, 56, 56, 64), (1, 14, 14, 256)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    def grouped(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=x.shape[-1])

    def shifted(x, kernel):
        height, width = x.shape[1], x.shape[2]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = 0
        for i in range(3):
            for j in range(3):
                out = out + padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0, :]
        return out

    print("| input (B, H, W, C) | grouped conv ms | shifted ms | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        kernel = jnp.asarray(rng.standard_normal((3, 3, 1, shape[-1]), dtype=np.float32))
        functions = {"grouped": jax.jit(grouped), "shifted": jax.jit(shifted)}
        outputs = {name: f(x, kernel).block_until_ready() for name, f in functions.items()}
        medians = {}
        for name, f in functions.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                f(x, kernel).block_until_ready()
                times.append(time.perf_counter() - start)
            medians[name] = 1000 * float(np.median(times))
        difference = float(jnp.max(jnp.abs(outputs["grouped"] - outputs["shifted"])))
        print(f"| {shape} | {medians['grouped']:.2f} | {medians['shifted']:.2f} | "
              f"{medians['grouped'] / medians['shifted']:.1f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
