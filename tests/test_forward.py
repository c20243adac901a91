"""The forward pass on any backend and devices: batches, the in-flight loop, devices, and the
reference features. `make test` runs the `backend` tests a second time under JAX with two
virtual CPU devices (KERAS_BACKEND=jax, XLA_FLAGS=--xla_force_host_platform_device_count=2)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
from conftest import shared_path

from dogscats import forward
from dogscats.backbones import build_backbone, get_backbone

pytestmark = pytest.mark.backend

BACKEND = keras.backend.backend()


def test_batches_cover_every_row_once_padded_to_one_shape():
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    seen = list(forward.batch_stream(images, batch_size=4, start=2))
    assert [(first, rows) for first, rows, _ in seen] == [(2, 4), (6, 4)]
    seen = list(forward.batch_stream(images, batch_size=4, start=0))
    assert [(first, rows) for first, rows, _ in seen] == [(0, 4), (4, 4), (8, 2)]
    last = seen[-1][2]
    assert last.shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(last[:2], images[8:])
    assert not last[2:].any()


def test_batches_come_through_put_in_order():
    images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1)
    put_calls = []

    def put(batch):
        put_calls.append(int(batch[0, 0, 0, 0]))
        return batch.copy()

    firsts = [int(b[0, 0, 0, 0]) for _, _, b in forward.batch_stream(images, 2, put=put, ahead=3)]
    assert firsts == [0, 2, 4, 6] and sorted(put_calls) == firsts


def test_a_read_error_reaches_the_caller():
    images = np.zeros((6, 1, 1, 3), np.uint8)

    def put(batch):
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(forward.batch_stream(images, 2, put=put))


class _Doubling:
    """A stand-in Forward: outputs 2x the batch, and records when each batch is fetched."""

    def __init__(self):
        self.events = []

    def put(self, batch):
        return batch

    def __call__(self, batch):
        self.events.append(("call", int(batch[0, 0])))
        return [batch * 2]

    def fetch(self, outputs):
        self.events.append(("fetch", int(outputs[0][0, 0]) // 2))
        return [np.asarray(o, np.float32) for o in outputs]


def test_run_forward_keeps_one_batch_in_flight_and_writes_every_row():
    images = np.arange(5, dtype=np.float32).reshape(5, 1)
    fake = _Doubling()
    written = {}
    forward.run_forward(images, fake, 2, lambda first, out: written.update({first: out[0]}))
    assert sorted(written) == [0, 2, 4]
    np.testing.assert_array_equal(np.concatenate([written[k] for k in (0, 2, 4)]), images * 2)
    # batch 2 is dispatched before batch 0 is fetched: the device is never left waiting
    assert fake.events[:3] == [("call", 0), ("call", 2), ("fetch", 0)]


def test_devices_are_checked_before_any_work():
    with pytest.raises(forward.DeviceError, match="DEVICES must be auto"):
        forward.place("gpus")
    with pytest.raises(forward.DeviceError, match="DEVICES"):
        forward.place("0")
    assert forward.place("cpu").devices == ["cpu:0"]


def test_more_devices_than_the_backend_sees_are_refused():
    match = "torch runs on one device" if BACKEND == "torch" else f"{BACKEND} sees"
    with pytest.raises(forward.DeviceError, match=match):
        forward.place("2" if BACKEND == "torch" else "64")


def test_a_batch_that_does_not_split_over_the_devices_is_rounded_up():
    where = forward.Placement(BACKEND, ["cpu:0", "cpu:1"])
    assert where.batch_size(5) == 6 and where.batch_size(4) == 4


def test_reference_images_give_the_reference_features_on_this_backend():
    """Each backend within 5e-5 of the same reference, so TF and JAX agree to 1e-4."""
    path = shared_path("data", "reference", "efficientnet_lite0.npz")
    reference = np.load(path)
    spec = get_backbone("efficientnet_lite0")
    model = build_backbone("efficientnet_lite0", weights="imagenet")
    step = forward.make_forward(model, spec, batch_size=8, flip=True, where=forward.place("1"))
    plain, mirrored = step.run(reference["images"])
    assert np.abs(plain - reference["features"]).max() < 5e-5
    assert not np.allclose(plain, mirrored)


def _devices() -> int:
    """How many devices Keras lists for the backend (PyTorch: one; Keras does not list them)."""
    return 1 if BACKEND == "torch" else len(keras.distribution.list_devices())


@pytest.mark.skipif(
    _devices() < 2,
    reason="needs two devices: make test gives TensorFlow two logical CPUs (conftest) and JAX "
    "two with XLA_FLAGS=--xla_force_host_platform_device_count=2; PyTorch uses one",
)
def test_two_devices_give_the_features_of_one():
    spec = dataclasses.replace(get_backbone("efficientnet_lite0"), input_size=32)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    outputs, described = {}, []
    for devices in ("1", "2"):
        where = forward.place(devices)
        described.append(where.describe())
        keras.utils.set_random_seed(0)  # the same random weights for both
        with where.scope():
            model = _tiny_backbone(32)
        step = forward.make_forward(model, spec, where.batch_size(3), flip=True, where=where)
        rows = {}
        forward.run_forward(images, step, step.batch_size, rows.__setitem__, progress=False)
        outputs[devices] = [np.concatenate([rows[k][i] for k in sorted(rows)]) for i in (0, 1)]
    single, split = f"{BACKEND} on 1 device (cpu:0)", f"{BACKEND} on 2 devices (cpu:0, cpu:1)"
    assert described == [single, split]
    for one, two in zip(outputs["1"], outputs["2"]):
        assert one.shape == (10, 8)
        np.testing.assert_allclose(two, one, atol=1e-5)


def _tiny_backbone(size: int) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
