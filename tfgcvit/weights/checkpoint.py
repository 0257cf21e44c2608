"""Reading PyTorch checkpoints without PyTorch and without running code from the file.

Supported files:

- `torch.save` zip archives (`.pth`, `.pth.tar`, `.pt`; PyTorch >= 1.6): a zip
  holding `<prefix>/data.pkl` (the pickled object tree), one
  `<prefix>/data/<key>` file of raw bytes per tensor storage, and
  `<prefix>/byteorder`.
- `.safetensors` files (through the optional `safetensors` package when it is
  installed, else through the small reader below).

The pickle is read by a restricted unpickler: it only knows the handful of
globals needed to rebuild tensors and inert containers, so a malicious file
cannot run code. Tensors are rebuilt lazily: the object tree is unpickled with
placeholders, and only the tensors under the requested entry (e.g.
`state_dict`) are read from the zip. The optimizer state that training
checkpoints also hold is never materialised, which keeps peak memory close to
the size of the weights.
"""

import argparse
import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: malformed, truncated, unsafe or unsupported."""


# Read storages in chunks so that at most this many bytes exist twice.
_READ_CHUNK_BYTES = 8 * 1024 * 1024

# Largest tensor with repeated elements (zero strides, from expand) to materialise.
_MAX_EXPANDED_ELEMENTS = 2**24

# torch dtype name -> (numpy dtype of the stored bytes, little-endian).
# bfloat16 is stored as its raw 16 bits and widened to float32 afterwards.
_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "complex128": "<c16",
    "complex64": "<c8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "?",
}

# Legacy typed storage classes (what `torch.save` still writes) -> dtype name.
_STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# A legacy (pre-1.6, non-zip) torch.save file starts with a pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


# ----------------------------------------------------------------------------
# Placeholders built by the unpickler.


class _Inert:
    """Base of the placeholder classes: a pickle cannot set their attributes."""

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(
            f"The checkpoint pickle tries to set the state of a {type(self).__name__}; "
            "real PyTorch checkpoints never do that. The file is corrupted or crafted."
        )


class _StorageType(_Inert):
    """Stands for `torch.FloatStorage` and friends (and `torch.UntypedStorage`)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args, **kwargs):
        raise CheckpointError("The checkpoint pickle calls a storage class; only tensors can be read.")


class _NamedCallable(_Inert):
    """A placeholder for a torch object that a checkpoint may name but must not call."""

    __slots__ = ("name",)
    prefix = ""

    def __init__(self, name):
        object.__setattr__(self, "name", name)

    def __call__(self, *args, **kwargs):
        raise CheckpointError(f"The checkpoint pickle calls {self.prefix}{self.name}; only tensors can be read.")


class _TorchDtype(_NamedCallable):
    """Stands for `torch.float32` and friends (arguments of `_rebuild_tensor_v3`)."""

    __slots__ = ()
    prefix = "torch."


class _TensorType(_NamedCallable):
    """Stands for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""

    __slots__ = ()


class _LazyStorage(_Inert):
    """A storage of the zip archive, read only if a selected tensor needs it."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key, dtype, numel):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "numel", numel)


class _LazyTensor(_Inert):
    """A tensor as described by the pickle: a view (offset, size, stride) of a storage."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        object.__setattr__(self, "storage", storage)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "stride", stride)


# ----------------------------------------------------------------------------
# The functions a checkpoint pickle may call. They only build placeholders.


def _int_tuple(value, what):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"Malformed tensor record in the checkpoint: {what} {value!r}.")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _LazyStorage):
        raise CheckpointError(
            f"Malformed tensor record in the checkpoint: storage is a {type(storage).__name__}."
        )
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise CheckpointError(f"Malformed tensor record in the checkpoint: offset {storage_offset!r}.")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(
            f"Malformed tensor record in the checkpoint: size {size} and stride {stride} differ in length."
        )
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    # Newer dtypes (uint16, ...) come with an untyped (byte) storage and a dtype.
    if not isinstance(storage, _LazyStorage) or not isinstance(dtype, _TorchDtype):
        raise CheckpointError("Malformed tensor record in the checkpoint (_rebuild_tensor_v3).")
    if dtype.name not in _DTYPES:
        raise CheckpointError(
            f"The checkpoint holds a tensor of dtype torch.{dtype.name}, which tfgcvit "
            f"cannot read; supported: {', '.join(sorted(_DTYPES))}."
        )
    itemsize = np.dtype(_DTYPES[dtype.name]).itemsize
    byte_numel = storage.numel * np.dtype(_DTYPES[storage.dtype]).itemsize
    typed = _LazyStorage(storage.key, dtype.name, byte_numel // itemsize)
    return _rebuild_tensor(typed, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _LazyTensor):
        raise CheckpointError("Malformed parameter record in the checkpoint.")
    return data


_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses: rebuild the plain tensor, ignore the Python-side state.
    if func not in _REBUILD_FUNCTIONS or not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise CheckpointError("Malformed tensor subclass record in the checkpoint.")
    return func(*args)


def _torch_size(values=()):
    return tuple(values)


def _torch_device(*args):
    return ":".join(str(a) for a in args)


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles encode bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError("Malformed bytes record in the checkpoint.")
    return text.encode(encoding)


def _allowed_globals():
    allowed = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        # Training arguments: a plain attribute container, inert.
        "argparse.Namespace": argparse.Namespace,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "_codecs.encode": _codecs_encode,
        "torch.Size": _torch_size,
        "torch.device": _torch_device,
        "torch.Tensor": _TensorType("torch.Tensor"),
        "torch.nn.parameter.Parameter": _TensorType("torch.nn.Parameter"),
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.storage.UntypedStorage": _StorageType("uint8"),
        "torch.UntypedStorage": _StorageType("uint8"),
    }
    for class_name, dtype in _STORAGE_TYPES.items():
        allowed[f"torch.{class_name}"] = _StorageType(dtype)
        allowed[f"torch.cuda.{class_name}"] = _StorageType(dtype)
    for dtype in _DTYPES:
        allowed[f"torch.{dtype}"] = _TorchDtype(dtype)
    for dtype in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        allowed[f"torch.{dtype}"] = _TorchDtype(dtype)  # refused with a clear message when used
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's object tree with placeholders instead of tensors."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path
        self._storages = {}

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[qualified]
        raise CheckpointError(
            f"Refusing to load {self._path!r}: its pickle refers to the global {qualified!r}, "
            "which is not part of a tensor checkpoint (it could run code). tfgcvit only "
            "reads tensors, training arguments and plain containers. If the file holds a "
            "whole pickled model, load it with PyTorch and save its state_dict() instead; "
            "if you did not make the file, do not trust it."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"Malformed storage reference in the checkpoint: {pid!r:.200}.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"Malformed storage reference in the checkpoint: type {storage_type!r:.100}.")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key):
            raise CheckpointError(f"Malformed storage key in the checkpoint: {key!r:.100}.")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"Malformed storage size in the checkpoint: {numel!r:.100}.")
        cache_key = (key, storage_type.dtype)
        if cache_key not in self._storages:
            self._storages[cache_key] = _LazyStorage(key, storage_type.dtype, numel)
        storage = self._storages[cache_key]
        if storage.numel != numel:
            raise CheckpointError(f"Storage {key!r} is declared with two different sizes in the checkpoint.")
        return storage


# ----------------------------------------------------------------------------
# The torch zip format.


def _check_pickle_opcodes(data, path):
    """Walks the pickle's opcodes without executing them.

    This rejects bad opcodes and truncated arguments with a clear message, and
    memo indices far beyond the pickle's size, which would make the C
    unpickler allocate (and zero) gigabytes for its memo table.
    """
    max_index = len(data)
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in _MEMO_OPCODES and isinstance(arg, int) and arg > max_index:
                raise CheckpointError(
                    f"The pickle in {path!r} is corrupted (memo index {arg} in a "
                    f"{len(data)}-byte pickle). Download or save the checkpoint again."
                )
    except CheckpointError:
        raise
    except Exception as error:  # pickletools raises ValueError and friends on bad input.
        raise CheckpointError(
            f"The pickle in {path!r} is corrupted ({error}). Download or save the checkpoint again."
        ) from None


class _TorchZip:
    """Access to the members of a `torch.save` zip archive."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
                struct.error, NotImplementedError, UnicodeError, OverflowError) as error:
            raise CheckpointError(
                f"{path!r} is not a readable zip archive ({error}): the file is truncated or "
                "corrupted. Delete it and download or save it again."
            ) from None
        pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            self.zip.close()
            raise CheckpointError(
                f"{path!r} is a zip archive but not a PyTorch checkpoint: it has "
                f"{'no' if not pickles else 'several'} '<name>/data.pkl' member"
                f"{'' if not pickles else 's'}. Save the weights with torch.save(...) "
                "(PyTorch >= 1.6) or as .safetensors."
            )
        self.prefix = pickles[0][: -len("data.pkl")]
        self.names = set(names)

    def close(self):
        self.zip.close()

    def read_member(self, name, max_bytes=None):
        """The whole content of a (small) member."""
        try:
            info = self.zip.getinfo(name)
            if max_bytes is not None and info.file_size > max_bytes:
                raise CheckpointError(f"Member {name!r} of {self.path!r} is implausibly large.")
            return self.zip.read(info)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(self._corrupted(name, error)) from None

    def read_storage(self, name, nbytes):
        """The bytes of storage member `name` as a uint8 array, which must hold exactly `nbytes`."""
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self.path!r} is incomplete: the storage file {name!r} is missing. The file "
                "is truncated or corrupted; download or save it again."
            ) from None
        # Compare sizes before allocating: a corrupted size must not allocate gigabytes.
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{self.path!r} is corrupted: storage {name!r} holds {info.file_size} bytes, "
                f"but its tensors need {nbytes}. Download or save the checkpoint again."
            )
        array = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(array)
        try:
            with self.zip.open(info) as member:
                position = 0
                while position < nbytes:
                    chunk = member.read(min(_READ_CHUNK_BYTES, nbytes - position))
                    if not chunk:
                        raise EOFError(f"{name!r} ends after {position} of {nbytes} bytes")
                    view[position : position + len(chunk)] = chunk
                    position += len(chunk)
                # Reading to the end makes zipfile compare the CRC-32.
                member.read(1)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(self._corrupted(name, error)) from None
        return array

    def _corrupted(self, name, error):
        return (
            f"{self.path!r} is corrupted or truncated: reading {name!r} failed "
            f"({type(error).__name__}: {error}). Delete the file and download or save it again."
        )


def _is_tensor_dict(value):
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(v, _LazyTensor) for v in value.values()
    )


def _select_entry(tree, entry, path):
    """The state dict named `entry` in the unpickled object tree."""
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path!r} holds a {type(tree).__name__}, not a dict of tensors or a training "
            "checkpoint. Save model.state_dict() with torch.save."
        )
    if _is_tensor_dict(tree):
        if entry == "state_dict":
            return tree
        raise CheckpointError(
            f"{path!r} is a plain state dict with no entries, so it has no {entry!r}; "
            "read it with entry='state_dict' (the default)."
        )
    available = [str(k) for k, v in tree.items() if _is_tensor_dict(v)]
    if entry not in tree:
        raise CheckpointError(
            f"{path!r} has no entry {entry!r}. Entries holding weights: "
            f"{', '.join(available) or 'none'} (all entries: "
            f"{', '.join(str(k) for k in list(tree)[:20])}). Pass one of the former as entry."
        )
    state = tree[entry]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"Entry {entry!r} of {path!r} is a {type(state).__name__}, not a state dict. "
            f"Entries holding weights: {', '.join(available) or 'none'}."
        )
    for key, value in state.items():
        if not isinstance(value, _LazyTensor):
            raise CheckpointError(
                f"Entry {entry!r} of {path!r} is not a state dict: {key!r} holds a "
                f"{type(value).__name__}, not a tensor. Entries holding weights: "
                f"{', '.join(available) or 'none'}."
            )
    return state


def _contiguous_strides(size):
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _tensor_array(name, tensor, storage_array, path):
    """The numpy array of one tensor: a view of its storage, bounds-checked."""
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    count = math.prod(size)
    if count == 0:
        return np.zeros(size, dtype=storage_array.dtype)
    # The stride of a dimension of size 1 is never used; a corrupted one must not overflow.
    stride = tuple(0 if s == 1 else st for s, st in zip(size, stride))
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= storage_array.size:
        raise CheckpointError(
            f"{path!r} is corrupted: tensor {name!r} (size {size}, stride {stride}, offset "
            f"{offset}) reaches beyond its storage of {storage_array.size} elements."
        )
    # Only tensors with zero strides (expand) can have more elements than their storage.
    if count > max(storage_array.size, _MAX_EXPANDED_ELEMENTS):
        raise CheckpointError(
            f"{path!r} is corrupted: tensor {name!r} has {count} elements, far more than its "
            f"storage of {storage_array.size}."
        )
    # Strides of dimensions of size 1 do not matter for the layout.
    contiguous = all(s == 1 or st == c for s, st, c in zip(size, stride, _contiguous_strides(size)))
    if contiguous and offset == 0 and count == storage_array.size:
        return storage_array.reshape(size)
    itemsize = storage_array.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage_array[offset:], shape=size, strides=[st * itemsize for st in stride], writeable=False
    )
    # A copy, so that a small view does not keep a large storage alive.
    return np.array(view)


def _to_native(array, dtype_name, byteorder):
    if byteorder == "big" and array.dtype.itemsize > 1:
        # The bytes were read as little-endian: reinterpret them, then convert to native.
        array = array.view(array.dtype.newbyteorder(">")).astype(array.dtype.newbyteorder("="))
    if dtype_name == "bfloat16":
        # bfloat16 is the upper half of a float32: widen exactly.
        return (array.astype(np.uint32) << 16).view(np.float32)
    if not array.dtype.isnative:  # Little-endian data on a big-endian machine.
        return array.astype(array.dtype.newbyteorder("="))
    return array


def _read_torch_zip(path, entry):
    archive = _TorchZip(path)
    try:
        data = archive.read_member(archive.prefix + "data.pkl")
        byteorder = "little"
        if archive.prefix + "byteorder" in archive.names:
            byteorder = archive.read_member(archive.prefix + "byteorder", max_bytes=16).decode(
                "ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path!r} declares an unknown byte order {byteorder!r:.20}.")
        _check_pickle_opcodes(data, path)
        try:
            tree = _RestrictedUnpickler(io.BytesIO(data), path).load()
        except CheckpointError:
            raise
        except Exception as error:  # Any failure inside the pickle VM means a bad file.
            raise CheckpointError(
                f"The pickle in {path!r} is corrupted ({type(error).__name__}: {error}). "
                "Download or save the checkpoint again."
            ) from None
        state = _select_entry(tree, entry, path)

        storage_arrays = {}  # Read each needed storage once (tensors may share one).
        result = {}
        for name, tensor in state.items():
            storage = tensor.storage
            cache_key = (storage.key, storage.dtype)
            if cache_key not in storage_arrays:
                if storage.dtype not in _DTYPES:
                    raise CheckpointError(
                        f"Tensor {name!r} in {path!r} has dtype torch.{storage.dtype}, which "
                        f"tfgcvit cannot read; supported: {', '.join(sorted(_DTYPES))}."
                    )
                dtype = np.dtype(_DTYPES[storage.dtype])
                raw = archive.read_storage(f"{archive.prefix}data/{storage.key}", storage.numel * dtype.itemsize)
                storage_arrays[cache_key] = raw.view(dtype)
            array = _tensor_array(name, tensor, storage_arrays[cache_key], path)
            result[str(name)] = _to_native(array, storage.dtype, byteorder)
        return result
    finally:
        archive.close()


# ----------------------------------------------------------------------------
# safetensors.

_SAFETENSORS_DTYPES = {
    "F64": ("<f8", "float64"),
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("i1", "int8"),
    "U64": ("<u8", "uint64"),
    "U32": ("<u4", "uint32"),
    "U16": ("<u2", "uint16"),
    "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}

# A header is JSON text; real ones are kilobytes. Bound it so a bad length cannot allocate gigabytes.
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def _safetensors_header(path):
    """Parses and validates the header: name -> (dtype code, shape, begin, end) and the data start."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path!r} is too short to be a safetensors file ({file_size} bytes).")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_SAFETENSORS_MAX_HEADER, file_size - 8):
            raise CheckpointError(
                f"{path!r} is not a valid safetensors file (header length {header_size} for a "
                f"{file_size}-byte file): it is truncated or corrupted."
            )
        raw = file.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path!r} has a corrupted safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r} has a corrupted safetensors header (not a JSON object).")
    data_start = 8 + header_size
    data_size = file_size - data_start
    tensors = {}
    for name, record in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = record["dtype"], record["shape"], record["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path!r}: malformed safetensors record for {name!r}.") from None
        if dtype_code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path!r}: tensor {name!r} has dtype {dtype_code!r:.20}, which tfgcvit cannot "
                f"read; supported: {', '.join(_SAFETENSORS_DTYPES)}."
            )
        shape = _int_tuple(shape, f"shape of {name!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
            raise CheckpointError(f"{path!r}: malformed data offsets for {name!r}.")
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype_code][0]).itemsize
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path!r} is truncated or corrupted: tensor {name!r} (shape {shape}, "
                f"{dtype_code}) has data offsets [{begin}, {end}) in {data_size} bytes of data."
            )
        tensors[name] = (dtype_code, shape, begin, end)
    return tensors, data_start


def _read_safetensors(path, entry):
    if entry != "state_dict":
        raise CheckpointError(
            f"{path!r} is a safetensors file: it holds one state dict and no entries, so it "
            f"has no {entry!r}. Read it with entry='state_dict' (the default)."
        )
    tensors, data_start = _safetensors_header(path)
    try:
        from safetensors import safe_open
    except ImportError:
        safe_open = None

    result = {}
    if safe_open is not None:
        # The package's numpy API has no bfloat16: those tensors go through our reader.
        try:
            with safe_open(path, framework="numpy") as file:
                for name, (dtype_code, _, _, _) in tensors.items():
                    if dtype_code != "BF16":
                        result[name] = np.array(file.get_tensor(name))
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{path!r} is not a readable safetensors file ({error}).") from None
    with open(path, "rb") as file:
        for name, (dtype_code, shape, begin, end) in tensors.items():
            if name in result:
                continue
            file.seek(data_start + begin)
            stored_dtype, dtype_name = _SAFETENSORS_DTYPES[dtype_code]
            array = np.empty(shape, dtype=stored_dtype)
            if end > begin and file.readinto(memoryview(array).cast("B")) != end - begin:
                raise CheckpointError(f"{path!r} is truncated: tensor {name!r} is incomplete.")
            result[name] = _to_native(array, dtype_name, "little")
    # Keep the file's tensor order (the header is in insertion order).
    return {name: result[name] for name in tensors}


# ----------------------------------------------------------------------------


def _strip_module_prefix(state):
    # Checkpoints saved from torch DistributedDataParallel prefix every name with "module.".
    if state and all(name.startswith("module.") for name in state):
        return {name[len("module."):]: value for name, value in state.items()}
    return state


def read_checkpoint(path, entry="state_dict"):
    """Reads the weights of a PyTorch checkpoint as numpy arrays, without PyTorch.

    Only the tensors of the requested entry are read from the file; the rest of
    a training checkpoint (optimizer state, other entries) is never loaded.
    The file's pickle is read by a restricted unpickler that cannot run code.

    Args:
        path: a `torch.save` zip file (`.pth`, `.pth.tar`, `.pt`; PyTorch >= 1.6),
            holding either a state dict or a training checkpoint (a dict with
            entries such as "state_dict", "state_dict_ema", "optimizer"), or a
            `.safetensors` file.
        entry: the entry of a training checkpoint to read: "state_dict" (the
            default, also right for a plain state dict) or e.g. "state_dict_ema".

    Returns:
        A dict from tensor names to numpy arrays, in the file's order, with a
        leading "module." (distributed training) removed. float32, float16 and
        integer tensors keep their dtype; bfloat16 becomes float32 (exactly).

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: the file is malformed, truncated, corrupted, unsafe,
            in the legacy (pre-1.6) format, or has no such entry.
    """
    path = os.fspath(path)
    if not isinstance(entry, str):
        raise TypeError(f"`entry` must be a string such as 'state_dict'; got {entry!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        raise CheckpointError(f"{path!r} is empty. Download or save the checkpoint again.")
    if head.startswith(b"PK"):
        state = _read_torch_zip(path, entry)
    elif head.startswith(_LEGACY_TORCH_MAGIC) or head[257:262] == b"ustar":
        raise CheckpointError(
            f"{path!r} is in the legacy (pre-1.6) PyTorch format, which tfgcvit does not "
            "read. Re-save it with torch>=1.6: torch.save(torch.load(path), new_path)."
        )
    elif path.endswith(".safetensors") or (len(head) > 8 and head[8:9] == b"{"):
        state = _read_safetensors(path, entry)
    else:
        raise CheckpointError(
            f"{path!r} is neither a PyTorch zip checkpoint (.pth, .pth.tar; torch.save with "
            "PyTorch >= 1.6) nor a .safetensors file. If it is a download, it may be an error "
            "page or a truncated file: delete it and download it again."
        )
    return _strip_module_prefix(state)
