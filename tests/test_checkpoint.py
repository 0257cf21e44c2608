"""Reading PyTorch checkpoints without PyTorch: correctness, laziness, safety, robustness."""

import io
import os
import pickle
import signal
import struct
import subprocess
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfgcvit.weights import checkpoint as checkpoint_module
from tfgcvit.weights.checkpoint import CheckpointError, read_checkpoint
from weights_helpers import (
    CHECKPOINT_FIXTURE,
    craft_torch_zip,
    pickle_tensor_dict,
    pickle_tensor_record,
    run_without_torch,
)


def test_fixture_logits_match_golden_without_torch():
    """The official-format fixture, read with torch unimportable, reproduces the official logits;
    its EMA weights are only read on request and are a different model."""
    result = run_without_torch(f"""
        import numpy as np
        import tfgcvit
        from tfgcvit.weights.pretrained import load_weights
        from weights_helpers import FIXTURE_MODEL_CONFIG, GOLDEN_FIXTURE, tolerance

        golden = np.load(GOLDEN_FIXTURE)
        model = tfgcvit.GCViT(**FIXTURE_MODEL_CONFIG)
        load_weights(model, {str(CHECKPOINT_FIXTURE)!r})
        logits = np.asarray(model(golden["inputs"], training=False))
        error = float(np.max(np.abs(logits - golden["logits"])))
        assert error <= tolerance(golden["logits"]), error

        load_weights(model, {str(CHECKPOINT_FIXTURE)!r}, entry="state_dict_ema")
        ema_logits = np.asarray(model(golden["inputs"], training=False))
        ema_error = float(np.max(np.abs(ema_logits - golden["logits"])))
        assert ema_error > 100 * tolerance(golden["logits"]), ema_error
        assert sys.modules["torch"] is None
        print("OK", error, ema_error)
    """, env={"PYTHONPATH": os.path.dirname(__file__)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_fixture_matches_torch_load_exactly():
    torch = pytest.importorskip("torch")
    reference = torch.load(CHECKPOINT_FIXTURE, map_location="cpu", weights_only=False)  # trusted fixture
    for entry in ("state_dict", "state_dict_ema"):
        state = read_checkpoint(CHECKPOINT_FIXTURE, entry=entry)
        assert list(state) == list(reference[entry])
        for name, tensor in reference[entry].items():
            assert state[name].dtype == tensor.numpy().dtype, name
            np.testing.assert_array_equal(state[name], tensor.numpy(), err_msg=name)


def _storage_keys(tree):
    """Storage keys of every lazy tensor in an unpickled object tree."""
    keys, stack = set(), [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, checkpoint_module._LazyTensor):
            keys.add(item.storage.key)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return keys


def test_only_the_chosen_entry_is_read(monkeypatch):
    """The optimizer state and the other entry are never read from the zip (peak memory)."""
    with zipfile.ZipFile(CHECKPOINT_FIXTURE) as archive:
        data = archive.read("custom_224.pth/data.pkl")
    tree = checkpoint_module._RestrictedUnpickler(io.BytesIO(data), "fixture").load()
    optimizer_keys = _storage_keys(tree["optimizer"])
    assert len(optimizer_keys) > 200  # Adam exp_avg / exp_avg_sq / step for every parameter

    read = []
    original = checkpoint_module._TorchZip.read_storage

    def recording_read_storage(self, name, nbytes):
        read.append(name.rsplit("/", 1)[1])
        return original(self, name, nbytes)

    monkeypatch.setattr(checkpoint_module._TorchZip, "read_storage", recording_read_storage)
    for entry in ("state_dict", "state_dict_ema"):
        read.clear()
        read_checkpoint(CHECKPOINT_FIXTURE, entry=entry)
        assert set(read) == _storage_keys(tree[entry])
        assert len(read) == len(set(read))  # each storage once
        assert not set(read) & optimizer_keys


def test_views_dtypes_and_tensor_kinds(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.randn(10, 12)
    tensors = {
        "transposed": base.t(),
        "slice": base[2:5, 3:9],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "bfloat16": torch.randn(5, 3).bfloat16(),
        "float16": torch.randn(4).half(),
        "float64": torch.randn(2, 2, dtype=torch.float64),
        "int64": torch.arange(6).reshape(2, 3),
        "int8": torch.arange(-3, 3, dtype=torch.int8),
        "uint16": torch.arange(5, dtype=torch.int32).to(torch.uint16),  # _rebuild_tensor_v3
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
        "parameter": torch.nn.Parameter(torch.randn(3)),
    }
    path = tmp_path / "kinds.pth"
    torch.save(tensors, path)
    state = read_checkpoint(path)
    assert list(state) == list(tensors)
    for name, tensor in tensors.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        assert state[name].dtype == expected.dtype, name
        assert state[name].shape == expected.shape, name
        np.testing.assert_array_equal(state[name], expected, err_msg=name)
    # Two tensors viewing one storage share the read, but are independent arrays.
    assert not np.shares_memory(state["transposed"], state["slice"])


def test_big_endian_archive(tmp_path):
    values = np.arange(6, dtype="<f4") * 1.5
    indices = np.arange(4, dtype="<i8") - 2
    pickled = pickle_tensor_dict({
        "values": pickle_tensor_record("0", 6, (2, 3), (3, 1)),
        "indices": pickle_tensor_record("1", 4, (4,), (1,), storage_class=b"LongStorage"),
    })
    path = craft_torch_zip(
        tmp_path / "big.pth", pickled,
        {"0": values.astype(">f4").tobytes(), "1": indices.astype(">i8").tobytes()}, byteorder=b"big",
    )
    state = read_checkpoint(path)
    np.testing.assert_array_equal(state["values"], values.reshape(2, 3))
    np.testing.assert_array_equal(state["indices"], indices)
    assert state["values"].dtype.isnative and state["indices"].dtype == np.int64


def test_plain_state_dict_and_entry_errors(tmp_path):
    torch = pytest.importorskip("torch")
    plain = tmp_path / "plain.pth"
    torch.save({"module.a": torch.ones(2), "module.b": torch.zeros(3)}, plain)
    # A plain state dict needs no entry; the distributed-training prefix is removed.
    state = read_checkpoint(plain)
    assert sorted(state) == ["a", "b"]
    np.testing.assert_array_equal(state["a"], np.ones(2, np.float32))
    with pytest.raises(CheckpointError, match="plain state dict"):
        read_checkpoint(plain, entry="state_dict_ema")

    with pytest.raises(CheckpointError) as error:
        read_checkpoint(CHECKPOINT_FIXTURE, entry="model")
    assert "no entry 'model'" in str(error.value)
    assert "state_dict, state_dict_ema" in str(error.value)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(CHECKPOINT_FIXTURE, entry="optimizer")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(CHECKPOINT_FIXTURE, entry="epoch")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------
# Malicious pickles.


class _Reduce:
    def __init__(self, function, arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def _malicious_pickles(marker):
    command = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').write('pwned')"
    import subprocess as subprocess_module

    return {
        "os.system": b"cos\nsystem\n(V" + command.encode() + b"\ntR.",
        "posix.system": pickle.dumps(_Reduce(os.system, (command,)), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, (python,)), protocol=4),  # STACK_GLOBAL
        "builtins.exec": b"cbuiltins\nexec\n(V" + python.encode() + b"\ntR.",
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess_module.Popen, (["touch", str(marker)],)), protocol=2,
                                         fix_imports=False),
        # Hidden inside an otherwise valid state dict.
        "nested os.system": pickle_tensor_dict({"w": pickle_tensor_record("0", 1, (1,), (1,))})[:-1]
        + b"Vevil\ncos\nsystem\n(V" + command.encode() + b"\ntRs.",
    }


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.eval", "builtins.exec",
                                  "subprocess.Popen", "nested os.system"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, name):
    marker = tmp_path / "marker"
    payload = _malicious_pickles(marker)[name]
    path = craft_torch_zip(tmp_path / "evil.pth", payload, {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    expected_global = {"posix.system": os.system.__module__ + ".system",
                       "nested os.system": "os.system"}.get(name, name)
    assert repr(expected_global) in str(error.value)
    assert "Refusing" in str(error.value)
    assert not marker.exists()


def test_raw_pickle_file_is_not_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    path.write_bytes(_malicious_pickles(marker)["posix.system"])
    with pytest.raises(CheckpointError, match="neither a PyTorch zip checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()


def test_pickle_cannot_set_state_of_placeholders(tmp_path):
    # BUILD on a rebuilt tensor would let a file overwrite its storage, offset or shape.
    record = pickle_tensor_record("0", 4, (4,), (1,))
    pickled = b"(dVw\n" + record + b"(dVoffset\nI100\nsbs."
    path = craft_torch_zip(tmp_path / "build.pth", pickled, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="set the state"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------
# Malformed files.


def _small_checkpoint_bytes(tmp_path):
    """A small training checkpoint (state_dict + optimizer + args), written by torch."""
    torch = pytest.importorskip("torch")
    from weights_helpers import save_training_checkpoint

    rng = np.random.default_rng(0)
    state = {"a.weight": rng.standard_normal((4, 3), dtype=np.float32),
             "a.bias": rng.standard_normal(4, dtype=np.float32),
             "a.index": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = save_training_checkpoint(tmp_path / "small.pth.tar", state, ema_state_dict=state)
    del torch
    return path.read_bytes(), state


def _rezip(data, replace=None, drop=()):
    """The archive `data` with members replaced or dropped (valid CRCs)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if any(info.filename.endswith(suffix) for suffix in drop):
                continue
            content = source.read(info)
            for suffix, new_content in (replace or {}).items():
                if info.filename.endswith(suffix):
                    content = new_content
            target.writestr(info.filename, content)
    return output.getvalue()


def _data_pkl(data):
    archive = zipfile.ZipFile(io.BytesIO(data))
    return archive.read([n for n in archive.namelist() if n.endswith("/data.pkl")][0])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return _small_checkpoint_bytes(tmp_path_factory.mktemp("small"))


def test_small_checkpoint_reads(small_checkpoint, tmp_path):
    data, state = small_checkpoint
    path = tmp_path / "ok.pth.tar"
    path.write_bytes(data)
    result = read_checkpoint(path)
    for name, value in state.items():
        np.testing.assert_array_equal(result[name], value)


def _malformed_cases(data):
    storage_name = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("/data/0"))
    storage = zipfile.ZipFile(io.BytesIO(data)).read(storage_name)
    return {
        "empty": (b"", "empty"),
        "random bytes": (os.urandom(300), "neither a PyTorch zip checkpoint"),
        "truncated zip": (data[: len(data) // 2], "not a readable zip archive"),
        "zip cut before the directory end": (data[:-10], "not a readable zip archive"),
        "not a torch zip": (_rezip(data, drop=("data.pkl",)), "not a PyTorch checkpoint"),
        "bad pickle opcodes": (_rezip(data, replace={"data.pkl": b"\xff\xfe\x00garbage"}), "pickle .* is corrupted"),
        "truncated pickle": (_rezip(data, replace={"data.pkl": _data_pkl(data)[:100]}), "pickle .* is corrupted"),
        "missing storage": (_rezip(data, drop=("/data/0",)), "storage file .* is missing"),
        "short storage": (_rezip(data, replace={"/data/0": storage[:-4]}), "holds .* bytes, but its tensors need"),
        "corrupted storage bytes (CRC)": (
            data.replace(storage, bytes([storage[0] ^ 1]) + storage[1:], 1), "corrupted or truncated"),
        "legacy torch format": (checkpoint_module._LEGACY_TORCH_MAGIC + b"\x00" * 50, "legacy .* torch>=1.6"),
        "huge memo index": (_rezip(data, replace={"data.pkl": b"\x80\x02}r\xff\xff\xff\x7f."}), "memo index"),
        "not a dict": (_rezip(data, replace={"data.pkl": pickle.dumps([1, 2], protocol=2)}), "holds a list"),
    }


@pytest.mark.parametrize("case", [
    "empty", "random bytes", "truncated zip", "zip cut before the directory end", "not a torch zip",
    "bad pickle opcodes", "truncated pickle", "missing storage", "short storage",
    "corrupted storage bytes (CRC)", "legacy torch format", "huge memo index", "not a dict",
])
def test_malformed_file_raises_checkpoint_error(small_checkpoint, tmp_path, case):
    data, expected_message = _malformed_cases(small_checkpoint[0])[case]
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=expected_message):
        read_checkpoint(path)


@pytest.mark.parametrize("record, message", [
    (pickle_tensor_record("0", 4, (10,), (1,)), "reaches beyond its storage"),
    (pickle_tensor_record("0", 4, (2, 2), (2, 1), offset=1), "reaches beyond its storage"),
    (pickle_tensor_record("0", 4, (2, 2), (1,)), "differ in length"),
    (pickle_tensor_record("0", 4, (-2,), (1,)), "Malformed tensor record"),
    (pickle_tensor_record("0", 8, (4,), (1,)), "holds 16 bytes, but its tensors need 32"),
    (pickle_tensor_record("../x", 4, (4,), (1,)), "Malformed storage key"),
    (pickle_tensor_record("0", 4, (4,), (1,), storage_class=b"QInt8Storage"), "'torch.QInt8Storage'"),
    (b"ctorch._utils\n_rebuild_tensor_v2\n(Vnot a storage\nI0\n(I1\nt(I1\ntI00\n)tR", "storage is a str"),
    (b"(Vstorage\nI3\ntQ", "Malformed storage reference"),
])
def test_inconsistent_tensor_records(tmp_path, record, message):
    path = craft_torch_zip(tmp_path / "bad.pth", pickle_tensor_dict({"w": record}),
                           {"0": np.arange(4, dtype=np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_crafted_zip_roundtrip(tmp_path):
    """The crafting helper itself is right: a consistent record reads back (strided view)."""
    path = craft_torch_zip(tmp_path / "ok.pth", pickle_tensor_dict({"w": pickle_tensor_record("0", 4, (2, 2), (1, 2))}),
                           {"0": np.arange(4, dtype=np.float32).tobytes()})
    np.testing.assert_array_equal(read_checkpoint(path)["w"], np.arange(4, dtype=np.float32).reshape(2, 2).T)


# ----------------------------------------------------------------------------
# Fuzzing: mutated files raise CheckpointError or read fine, nothing else, never hang.


class _Hang(Exception):
    pass


def _read_with_alarm(path, seconds=10):
    if not hasattr(signal, "SIGALRM"):  # Windows: no watchdog, the deadline still reports slowness
        try:
            return read_checkpoint(path)
        except CheckpointError:
            return None

    def on_alarm(signum, frame):
        raise _Hang(f"read_checkpoint did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return read_checkpoint(path)
    except CheckpointError:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 64)),
)


def _mutate(data, mutations):
    data = bytearray(data)
    for kind, position, value in mutations:
        position = position % (len(data) + 1)
        if kind == "set" and position < len(data):
            data[position] = value
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = bytes([value])
        elif kind == "delete":
            del data[position:position + value]
    return bytes(data)


def _check_result(result):
    assert result is None or (isinstance(result, dict) and all(isinstance(v, np.ndarray) for v in result.values()))


@settings(max_examples=150, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_archive(small_checkpoint, tmp_path, mutations):
    path = tmp_path / "fuzz.pth.tar"
    path.write_bytes(_mutate(small_checkpoint[0], mutations))
    _check_result(_read_with_alarm(path))


@settings(max_examples=150, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_pickle_with_valid_zip(small_checkpoint, tmp_path, mutations):
    """Mutations of data.pkl inside a well-formed zip reach the restricted unpickler."""
    data = small_checkpoint[0]
    path = tmp_path / "fuzz.pth.tar"
    path.write_bytes(_rezip(data, replace={"data.pkl": _mutate(_data_pkl(data), mutations)}))
    _check_result(_read_with_alarm(path))


# ----------------------------------------------------------------------------
# safetensors.


def _safetensors_file(path, tensors):
    """A safetensors file written by hand (also covers bfloat16, which numpy lacks)."""
    import json

    header, blobs, offset = {}, [], 0
    for name, (code, array) in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


@pytest.mark.parametrize("with_package", [True, False])
def test_safetensors(tmp_path, monkeypatch, with_package):
    if with_package:
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((3, 4), dtype=np.float32)
    bf16_bits = (weight.view(np.uint32) >> 16).astype(np.uint16)
    path = _safetensors_file(tmp_path / "w.safetensors", {
        "weight": ("F32", weight),
        "half": ("F16", weight.astype(np.float16)),
        "index": ("I64", np.arange(5, dtype=np.int64)),
        "bf16": ("BF16", bf16_bits),
    })
    state = read_checkpoint(path)
    assert list(state) == ["weight", "half", "index", "bf16"]
    np.testing.assert_array_equal(state["weight"], weight)
    np.testing.assert_array_equal(state["half"], weight.astype(np.float16))
    np.testing.assert_array_equal(state["index"], np.arange(5))
    np.testing.assert_array_equal(state["bf16"], (bf16_bits.astype(np.uint32) << 16).view(np.float32))
    with pytest.raises(CheckpointError, match="no entries"):
        read_checkpoint(path, entry="state_dict_ema")

    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(truncated)
    bad_header = tmp_path / "bad.safetensors"
    bad_header.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        read_checkpoint(bad_header)
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        read_checkpoint(huge_header)


def test_safetensors_written_by_the_package_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.arange(3)}
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    state = read_checkpoint(path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(state[name], tensor.float().numpy() if name == "b" else tensor.numpy())


def test_reader_module_imports_no_torch():
    result = subprocess.run(
        [__import__("sys").executable, "-c",
         "import sys, importlib.util\n"
         "spec = importlib.util.spec_from_file_location('checkpoint', 'tfgcvit/weights/checkpoint.py')\n"
         "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
         "module.read_checkpoint(sys.argv[1])\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'keras', 'tensorflow')))",
         str(CHECKPOINT_FIXTURE)],
        cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
