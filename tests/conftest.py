"""Shared fixtures: tiny Kaggle-layout datasets made on the fly, and the ../shared locator."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run Keras's forward pass unless they ask for LiteRT (tests/test_litert.py): `make` and
# the CLI would otherwise export every backbone a test extracts (seconds each) into KERAS_HOME.
os.environ["RUNTIME"] = "keras"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def as_a_terminal_starts_it() -> None:
    """preexec_fn for a child that a test stops with Ctrl-C or a hangup: the signals' default
    actions, as a terminal's foreground job has them. A suite started in the background of a
    shell without job control (`cmd &` in a script) inherits SIGINT ignored, and so would make and
    the CLI it starts."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def pytest_configure(config) -> None:
    """Under TensorFlow, two logical CPU devices, as XLA_FLAGS gives JAX in make test's second
    pass, so that the several-device tests run on both backends. It must happen before
    TensorFlow runs anything (collection lists devices). Ops still go to the first device
    unless a test asks for both (DEVICES=auto on a CPU is one device)."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`make test`: --dist loadgroup), a test that uses a module- or
    session-scoped fixture runs on the worker of its module's other such tests, so that each
    fixture is built once, not once per worker. Other tests go to whichever worker is free."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for ds in (defs.name2fixturedefs.values() if defs else ()) for d in ds}
        if scopes & {"module", "package", "session"}:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared data beside the checkout")
    return path


def write_kaggle_dataset(
    root: Path, n_train: int = 8, n_test: int = 6, size: int = 40, seed: int = 0
) -> Path:
    """A Kaggle-layout folder: cats are reddish, dogs bluish, so a head can learn them."""
    import cv2
    import pandas as pd

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()

    def image(dog: bool) -> np.ndarray:
        rgb = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        rgb[..., 2 if dog else 0] += 150
        return rgb

    def bgr(rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR

    for i in range(n_train):
        for label, name in ((0, "cat"), (1, "dog")):
            cv2.imwrite(str(root / "train" / f"{name}.{i}.jpg"), bgr(image(label)))
    for i in range(1, n_test + 1):
        cv2.imwrite(str(root / "test" / f"{i}.jpg"), bgr(image(i % 2 == 0)))
    ids = list(range(1, n_test + 1))
    pd.DataFrame({"id": ids, "label": 0.5}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ids, "label": [i % 2 for i in ids]}).to_csv(
        root / "test_labels.csv", index=False
    )
    return root


@pytest.fixture
def kaggle_dataset(tmp_path: Path) -> Path:
    return write_kaggle_dataset(tmp_path / "comp")


def extract_random(data_dir, arrays_dir, out, backbone="resnet50", **kwargs):
    """features.extract of random weights, in small batches, without a progress bar."""
    from dogscats import features

    return features.extract(
        data_dir,
        backbone,
        weights="random",
        arrays_dir=arrays_dir,
        out=out,
        batch_size=4,
        progress=False,
        **kwargs,
    )


def write_features(path, ids, labels, feats, test_ids, test_feats, flip=False) -> None:
    """A feature file of the layout features.extract writes, from given arrays."""
    import h5py

    with h5py.File(path, "w") as f:
        for split, i, x, lab in (
            ("train", ids, feats, labels),
            ("test", test_ids, test_feats, [-1] * len(test_ids)),
        ):
            g = f.create_group(split)
            g["ids"] = np.array(i, dtype="S")
            g["labels"] = np.array(lab, dtype="int8")
            g["features"] = x
            if flip:
                g["features_flip"] = x + 0.01


def separable(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column separates the two classes: any head learns them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, dim)).astype("float32")
    X[:, 0] += 3 * (2 * y - 1)
    return X, y


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# A backbone small enough for tests that run a stage many times: one 3x3 convolution and GAP,
# registered like any entry (the keras.applications builder signature).


def tiny_net(include_top=False, weights=None, input_shape=None, pooling="avg", **_):
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )


def tiny_preprocess(x):
    return x / 127.5 - 1


def register_tiny_backbone(size: int = 16) -> str:
    """The tiny network's registry name at this input size (registered on first use)."""
    from dogscats import backbones

    name = f"tiny_test_net_{size}"
    if name not in backbones.list_backbones():
        spec = backbones.BackboneSpec(
            name, size, 8, "conftest:tiny_net", "conftest:tiny_preprocess"
        )
        backbones.register(spec)
    return name


def plan_without_heavy_imports(args: list[str], heavy: set[str]) -> str:
    """`dogscats.cli plan ARGS` in a fresh interpreter that must not import any of `heavy`
    (make runs the plan before the venv exists, so it needs only the standard library);
    returns its output."""
    import subprocess
    import sys

    code = (
        f"import sys; from dogscats import cli; cli.main(['plan', *{args!r}]); "
        f"heavy = {sorted(heavy)!r}; loaded = set(heavy) & set(sys.modules); "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
