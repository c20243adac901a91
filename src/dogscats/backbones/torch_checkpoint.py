"""Read legacy (pre-1.6, non-zip) PyTorch checkpoints with the standard library and NumPy only.

A legacy file is a sequence of pickles: a magic number, the format version, system info (byte
order, type sizes), the saved object (tensors point at storages via persistent ids), the list
of storage keys, and then, for each key in that order, an int64 element count followed by the
storage's raw bytes. The saved object is read with an allow-list of globals, never arbitrary
code, and each tensor is rebuilt from its storage with its offset, size and stride: conv
weights are often saved as permuted, non-contiguous views, which a plain reshape would
silently scramble.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage classes the reader understands, and the NumPy dtype (little-endian) of their items.
STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("FloatStorage", "<f4"),
        ("DoubleStorage", "<f8"),
        ("HalfStorage", "<f2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    )
}


class CheckpointFormatError(ValueError):
    """The file is not a legacy PyTorch checkpoint this reader can safely load."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage & co. while unpickling."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage announced by the object pickle; its bytes arrive after it."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageView:
    """Pre-1.0 files may reference a slice of a root storage (view_metadata)."""

    root: _Storage
    offset: int
    numel: int

    @property
    def dtype(self) -> np.dtype:
        return self.root.dtype


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor whose storage has not been read yet."""

    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *_) -> Any:
    if not isinstance(storage, (_Storage, _StorageView)):
        raise CheckpointFormatError(f"Tensor built from a non-storage: {type(storage).__name__}")
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_) -> Any:
    # A Parameter is only a tensor with a flag; the flag means nothing for reading weights.
    return data


_ALLOWED_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages become placeholders filled in later."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        raise CheckpointFormatError(
            f"Refusing to load global {module}.{name}: only plain tensors and state dicts are "
            "allowed in a checkpoint."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointFormatError(f"Unsupported persistent id in checkpoint: {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"Unknown storage type in checkpoint: {storage_type!r}")
        root = self.storages.setdefault(str(key), _Storage(str(key), storage_type.dtype, numel))
        if root.dtype != storage_type.dtype:
            raise CheckpointFormatError(f"Storage {key} is referenced with two dtypes.")
        if view_metadata is None:
            return root
        _view_key, offset, view_numel = view_metadata
        return _StorageView(root, int(offset), int(view_numel))


def _load_pickle(file: io.BufferedIOBase) -> Any:
    # Header pickles hold only ints, strings and dicts; the allow-list rejects anything else.
    return _RestrictedUnpickler(file).load()


def _check_header(file: io.BufferedIOBase, path: str) -> None:
    try:
        magic = _load_pickle(file)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointFormatError(
            f"{path} is not a legacy PyTorch checkpoint: {error}"
        ) from None
    if magic != LEGACY_MAGIC:
        raise CheckpointFormatError(f"{path} is not a legacy PyTorch checkpoint (bad magic).")
    version = _load_pickle(file)
    if version != LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {version!r}.")
    sys_info = _load_pickle(file)
    if not sys_info.get("little_endian", False):
        raise CheckpointFormatError(f"{path} was saved on a big-endian machine; not supported.")


def _read_storages(file: io.BytesIO, keys: list[str], storages: dict[str, _Storage]) -> None:
    """Fill each storage from the bytes that follow the pickles, in the order of `keys`."""
    buffer = file.getbuffer()
    position = file.tell()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointFormatError(f"Storage {key} is listed but no tensor uses it.")
        (numel,) = struct.unpack_from("<q", buffer, position)
        position += 8
        nbytes = numel * storage.dtype.itemsize
        if numel != storage.numel or position + nbytes > len(buffer):
            raise CheckpointFormatError(
                f"Storage {key}: expected {storage.numel} elements, file has {numel} "
                f"({len(buffer) - position} bytes left)."
            )
        storage.data = np.frombuffer(buffer, storage.dtype, count=numel, offset=position).copy()
        position += nbytes
    missing = sorted(set(storages) - {str(key) for key in keys})
    if missing:
        raise CheckpointFormatError(f"Storages referenced but never written: {missing}")


def _storage_array(storage: _Storage | _StorageView) -> np.ndarray:
    if isinstance(storage, _StorageView):
        return _storage_array(storage.root)[storage.offset : storage.offset + storage.numel]
    assert storage.data is not None, storage.key
    return storage.data


def _materialise(tensor: _LazyTensor) -> np.ndarray:
    """Copy a tensor out of its storage honouring offset, size and stride (never a reshape)."""
    flat = _storage_array(tensor.storage)
    if len(tensor.size) != len(tensor.stride) or min(tensor.stride, default=0) < 0:
        raise CheckpointFormatError(f"Bad tensor geometry: {tensor.size} / {tensor.stride}")
    if 0 in tensor.size:
        return np.zeros(tensor.size, flat.dtype)
    # as_strided reads raw memory, so bounds are checked before it is called.
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if tensor.offset < 0 or last >= flat.size:
        raise CheckpointFormatError(
            f"Tensor of size {tensor.size}, stride {tensor.stride} at offset {tensor.offset} "
            f"overruns its storage of {flat.size} elements."
        )
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * flat.itemsize for s in tensor.stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    arrays: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(value, _LazyTensor):
            raise CheckpointFormatError(f"{path}: entry {name!r} is not a tensor.")
        arrays[str(name)] = _materialise(value)
    return arrays


def load_legacy_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy PyTorch state dict into {name: contiguous NumPy array}, in file order."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path} is a zip-format PyTorch checkpoint (torch >= 1.6 default), which is not "
            "supported: only the legacy format can be read without PyTorch. Re-save it with "
            "torch.save(..., _use_new_zipfile_serialization=False)."
        )
    with open(path, "rb") as handle:
        file = io.BytesIO(handle.read())
    _check_header(file, path)
    unpickler = _RestrictedUnpickler(file)
    try:
        obj = unpickler.load()
        keys = _load_pickle(file)
    except (pickle.UnpicklingError, EOFError) as error:
        raise CheckpointFormatError(f"{path}: corrupt checkpoint ({error}).") from None
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{path}: storage key list missing.")
    _read_storages(file, keys, unpickler.storages)
    return _state_dict(obj, path)
