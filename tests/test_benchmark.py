"""`python -m tfgcvit.benchmark` runs end to end and reports sane figures."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from tfgcvit import benchmark
from tfgcvit.model.gcvit import VARIANTS


def test_json_report_is_sane():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "tfgcvit.benchmark", "--model", "xxtiny", "--batch-size", "1",
               "--size", "64", "--repeats", "2", "--warmup", "1", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["model"] == "xxtiny"
    assert (result["batch_size"], result["height"], result["width"]) == (1, 64, 64)
    assert result["backend"] in benchmark.BACKENDS
    assert result["path"] in benchmark.PATHS[result["backend"]][2]
    assert result["images_per_second"] > 0
    latency = result["latency_ms"]
    assert 0 < latency["min"] <= latency["p25"] <= latency["median"] <= latency["p75"] <= latency["max"]
    assert result["images_per_second"] == pytest.approx(1e3 / latency["median"])
    assert 0 < result["constructor_seconds"] < result["time_to_first_output_seconds"]
    assert result["peak_rss_mib"] > 50
    assert result["gflop_per_image"] > 0 and result["achieved_gflop_per_second"] > 0
    assert result["params"] == 11_995_428


def test_another_backend_is_measured_in_a_child_process(capfd):
    """Keras fixed its backend at import: the benchmark re-runs itself with the requested one."""
    import keras

    other = "jax" if keras.backend.backend() != "jax" else "tensorflow"
    args = benchmark.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "xxtiny", "--backend", other, "--size", "32", "--batch-size", "1",
         "--repeats", "1", "--warmup", "0", "--json"])
    assert benchmark.main(args) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["backend"] == other and keras.backend.backend() != other
    assert (result["height"], result["width"]) == (32, 32)


def test_paths_and_sizes():
    assert benchmark.choose_path("tensorflow") == "function"
    assert benchmark.choose_path("tensorflow", jit=True) == "xla"
    assert benchmark.choose_path("torch", jit=False) == "eager"
    assert benchmark.choose_path("jax", path="predict") == "predict"
    with pytest.raises(ValueError):
        benchmark.choose_path("jax", path="xla")
    assert benchmark.parse_size("256") == (256, 256)
    assert benchmark.parse_size("224x320") == (224, 320)
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.parse_size("16")


def test_flop_count_matches_torch_flop_counter():
    # torch.utils.flop_counter.FlopCounterMode on timm 1.0.31's models, batch 1, 224x224.
    expected = {"xxtiny": 4.24158464e9, "tiny": 9.522006528e9, "small": 17.059093248e9,
                "base": 29.63247616e9}
    for name, flops in expected.items():
        assert benchmark.flop_count(VARIANTS[name], 224, 224) == pytest.approx(flops, rel=1e-9), name
