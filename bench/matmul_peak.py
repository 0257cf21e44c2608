"""Float32 matmul throughput of this CPU, per library and thread count.

The reference for "fraction of the ceiling" figures, and the evidence for where
batch-1 time goes: prints GFLOP/s of a large square matmul (the machine's
peak) and of the GCViT-Tiny stage-3 dense shapes at batch 1 and 8 (tokens x
256 @ 256 x 768), for TensorFlow (a chain of 19 dependent matmuls inside one
`tf.function`, as in the model) and PyTorch (eager), with 1 and 2 threads.

Usage (from the repository root):
    .venv/bin/python bench/matmul_peak.py

Each configuration runs in its own process so that thread settings apply.
"""

import json
import os
import subprocess
import sys
import time

SHAPES = [(2048, 2048, 2048), (196, 256, 768), (1568, 256, 768)]
CHAIN = 19


def measure(library, threads):
    """GFLOP/s per shape for one library and thread count (run in a child process)."""
    import numpy as np

    results = {}
    if library == "tensorflow":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    else:
        import torch

        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        weights = [rng.standard_normal((k, n), dtype=np.float32) * 0.03 for _ in range(CHAIN)]
        if library == "tensorflow":
            tx = tf.constant(x)
            tw = [tf.Variable(w) for w in weights]
            # Every matmul in one graph (no per-call overhead), one at a time
            # (a single inter-op thread), each result used so none is pruned.
            run = tf.function(lambda: tf.add_n([tf.matmul(tx, w)[0, 0] for w in tw]))
            step = lambda: run().numpy()
        else:
            tx = torch.from_numpy(x)
            tw = [torch.from_numpy(w) for w in weights]

            def step():
                with torch.no_grad():
                    for w in tw:
                        tx @ w

        for _ in range(2):
            step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results[f"{m}x{k}@{k}x{n}"] = 2 * m * k * n * CHAIN / sorted(times)[2] / 1e9
    return results


def main():
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return
    print("| library | threads | " + " | ".join(f"{m}x{k} @ {k}x{n}" for m, k, n in SHAPES) + " |")
    print("|---|---|" + "---|" * len(SHAPES))
    for library in ("tensorflow", "torch"):
        for threads in (1, 2):
            out = subprocess.run([sys.executable, __file__, library, str(threads)],
                                 capture_output=True, text=True, check=True).stdout
            gflops = json.loads(out.strip().splitlines()[-1])
            print(f"| {library} | {threads} | "
                  + " | ".join(f"{value:.0f} GFLOP/s" for value in gflops.values()) + " |")


if __name__ == "__main__":
    main()
