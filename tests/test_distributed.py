"""Data-parallel fine-tuning on two virtual CPU devices matches one device.

examples/distributed.py trains the same model from the same weights on the
same batches once on one device and once data-parallel (JAX:
keras.distribution.DataParallel; TensorFlow: tf.distribute.MirroredStrategy),
each in a fresh process because the device split must happen before the
engine starts. The logged losses of the first steps must agree: the first
checks the sharded forward pass, the second the all-reduced gradients.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "distributed.py"
# Relative agreement of the per-step losses. Measured: identical (0.0) on both engines.
LOSS_TOLERANCE = 1e-5


ENGINES = ["jax", "tensorflow"]


def run_distributed(engine):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    environment.pop("KERAS_BACKEND", None)  # the script selects the engine itself
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--engine", engine, "--virtual-devices", "2", "--steps", "2",
         "--depths", "1", "2", "1", "1"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("engine", ENGINES)
def test_data_parallel_first_steps_match_single_device(engine):
    pytest.importorskip(engine)
    result = run_distributed(engine)
    assert result["engine"] == engine
    assert result["replicas"] == 2 and len(result["devices"]) == 2
    single, parallel = result["single_device_losses"], result["data_parallel_losses"]
    assert len(single) == len(parallel) == 2
    assert all(math.isfinite(loss) for loss in single + parallel)
    for a, b in zip(single, parallel):
        assert abs(a - b) <= LOSS_TOLERANCE * max(1.0, abs(a)), (single, parallel)
    # The second logged loss includes one update: it moved, so the step really trained.
    assert single[1] != single[0]
