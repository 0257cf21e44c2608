"""Test data and helpers without pytest: fixture paths and config, official tables, checkpoints, servers.

conftest.py re-exports the fixture constants for the tests and adds the pytest fixtures.

- `run_without_torch`: runs Python code in a subprocess where `import torch` fails.
- `craft_torch_zip` / `pickle_tensor_dict`: hand-made torch zip archives, for
  malformed and malicious inputs that torch itself would never write.
- `save_training_checkpoint`: an official-format training checkpoint (state_dict,
  optimizer state, args as argparse.Namespace, ...) written by torch.save.
- `FileServer`: an HTTP server on 127.0.0.1 whose answers can be normal,
  truncated, corrupted, an HTTP 500, a closed connection, slow, or stalled.
"""

import argparse
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The repository carries its own test data (tests/data/README.md says where each file came from).
DATA = REPO / "tests" / "data"
FIXTURES = DATA / "fixtures"
REFERENCE = DATA / "reference"
CHECKPOINT_FIXTURE = FIXTURES / "custom_224.pth.tar"
GOLDEN_FIXTURE = FIXTURES / "custom_224_golden.npz"

# Parameter counts of the official models (GC ViT notes, section 1:
# 1000-class head, no relative_position_index buffers).
OFFICIAL_PARAMS = {
    "xxtiny": 11_995_428, "xtiny": 19_981_294, "tiny": 28_221_974, "tiny2": 34_535_654,
    "small": 51_092_173, "small2": 68_615_197, "base": 90_320_836, "large": 202_075_570,
    "large_384": 202_860_610, "large_512": 203_795_362,
}

# Arguments of the fixture model (custom_224_config.json).
FIXTURE_MODEL_CONFIG = dict(
    window_size=(7, 7, 14, 7), embed_dim=16, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
    mlp_ratio=3, layer_scale=1e-5, classes=10, classifier_activation=None,
)

BLOCK_TORCH = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def tolerance(reference):
    """The project's parity tolerance: 1e-4 * max(1, max |reference|)."""
    return 1e-4 * max(1.0, float(np.max(np.abs(reference))))


def run_without_torch(code, env=None, timeout=180):
    """Runs `code` in a fresh Python where torch cannot be imported; returns the CompletedProcess."""
    environment = dict(os.environ, **(env or {}))
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout,
    )


# ----------------------------------------------------------------------------
# Hand-made torch zip archives.


def craft_torch_zip(path, pickle_bytes, storages=None, byteorder=b"little", prefix="archive"):
    """Writes a zip laid out like torch.save's: <prefix>/data.pkl, <prefix>/data/<key>, byteorder."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pickle_bytes)
        if byteorder is not None:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", b"3\n")
    return path


def _int_tuple_ops(values):
    return b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"


def pickle_tensor_record(key, numel, size, stride, offset=0, storage_class=b"FloatStorage"):
    """Protocol-0 opcodes that call torch._utils._rebuild_tensor_v2 like torch.save writes it."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"(Vstorage\nctorch\n" + storage_class + b"\nV" + key.encode() + b"\nVcpu\nI%d\ntQ" % numel
        + b"I%d\n" % offset + _int_tuple_ops(size) + _int_tuple_ops(stride)
        + b"I00\nccollections\nOrderedDict\n)RtR"
    )


def pickle_tensor_dict(records):
    """A pickled dict {name: tensor record}; `records` maps names to pickle_tensor_record bytes."""
    body = b"".join(b"V" + name.encode() + b"\n" + record + b"s" for name, record in records.items())
    return b"(d" + body + b"."


# ----------------------------------------------------------------------------
# Checkpoints written by torch.


def official_shapes(variant):
    """Official state dict shapes of a variant, from the shared reference."""
    with open(REFERENCE / "official_state_dict_shapes.json", encoding="utf-8") as file:
        return {name: tuple(shape) for name, shape in json.load(file)[variant].items()}


def random_state_dict(shapes, seed):
    """Random arrays of the given shapes: float32 weights, int64 index buffers."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            state[name] = rng.integers(0, 100, size=shape, dtype=np.int64)
        else:
            state[name] = rng.standard_normal(shape, dtype=np.float32) * 0.05
    return state


def save_training_checkpoint(path, state_dict, ema_state_dict=None, optimizer=True):
    """torch.save of a timm-style training checkpoint holding `state_dict` (numpy arrays)."""
    import torch
    from collections import OrderedDict

    def tensors(state):
        return OrderedDict((name, torch.from_numpy(np.ascontiguousarray(value))) for name, value in state.items())

    checkpoint = {
        "epoch": 309,
        "arch": "gc_vit_test",
        "state_dict": tensors(state_dict),
        "version": 2,
        "metric": 80.0,
        "args": argparse.Namespace(model="gc_vit_test", lr=1e-3, epochs=310, model_ema=True),
    }
    if optimizer:
        float_values = [torch.from_numpy(v) for v in state_dict.values() if v.dtype == np.float32]
        checkpoint["optimizer"] = {
            "state": {
                index: {"step": torch.tensor(float(index)), "exp_avg": value * 0.1, "exp_avg_sq": value * value}
                for index, value in enumerate(float_values)
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(len(float_values)))}],
        }
    if ema_state_dict is not None:
        checkpoint["state_dict_ema"] = tensors(ema_state_dict)
    torch.save(checkpoint, path)
    return path


# ----------------------------------------------------------------------------
# A local HTTP server.


class FileServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1, with a chosen behaviour per path.

    `modes[path]` is one of "ok", "truncate" (announce the full length, send half,
    close), "corrupt" (flip one byte), "error500", "close" (close without an
    answer), "slow" (send in small pieces with pauses), "stall" (send half, then
    nothing until the server stops: a download that is in progress for as long
    as a test needs). `requests` records every GET path.
    """

    def __init__(self, files=None, modes=None):
        self.files = dict(files or {})
        self.modes = dict(modes or {})
        self.requests = []
        self.stopped = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                mode = server.modes.get(self.path, "ok")
                if mode == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if mode == "error500":
                    self.send_error(500, "Internal Server Error")
                    return
                if self.path not in server.files:
                    self.send_error(404, "Not Found")
                    return
                data = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif mode == "corrupt":
                    middle = len(data) // 2
                    self.wfile.write(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
                elif mode == "stall":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    server.stopped.wait(120)
                elif mode == "slow":
                    step = max(1, len(data) // 20)
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start:start + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self.stopped.set()
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
