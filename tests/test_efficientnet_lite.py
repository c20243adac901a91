"""EfficientNet-Lite0/1/2: architecture, real ImageNet weights against reference outputs, cache.

Each variant is built once per module with ImageNet weights (converted into a temporary
KERAS_HOME); the reference test needs /work/shared and skips without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from dogscats.backbones import efficientnet_lite as lite  # noqa: E402
from dogscats.backbones import efficientnet_lite_weights as lite_weights  # noqa: E402
from dogscats.backbones import get_backbone  # noqa: E402
from dogscats.backbones.torch_checkpoint import load_legacy_checkpoint  # noqa: E402

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference"
BUILDERS = {0: lite.EfficientNetLite0, 1: lite.EfficientNetLite1, 2: lite.EfficientNetLite2}
SIZES = {0: 224, 1: 240, 2: 260}
# With top, the parameter count equals the checkpoint's float elements (BN statistics included).
PARAMS = {0: 4_694_024, 1: 5_470_344, 2: 6_150_168}
# Blocks per stage and stage output channels, as the B0 table scaled by width/depth implies.
REPEATS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
CHANNELS = {
    0: (16, 24, 40, 80, 112, 192, 320),
    1: (16, 24, 40, 80, 112, 192, 320),
    2: (16, 24, 48, 88, 120, 208, 352),
}
STAGE_REDUCTION = (2, 4, 8, 16, 16, 32, 32)  # the stem halves, then stages 2, 3, 4 and 6
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """Converted weights go to a temporary KERAS_HOME, never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("keras_home")
        patch.setenv("KERAS_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def imagenet_model(keras_home):
    """Memoised builder: variant -> model with top and ImageNet weights, logits output."""
    built: dict[int, keras.Model] = {}

    def get(variant: int) -> keras.Model:
        if variant not in built:
            built[variant] = BUILDERS[variant](classifier_activation=None)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def lite0_state():
    return load_legacy_checkpoint(lite_weights.checkpoint_path(0))


def _images(variant: int, count: int = 2) -> np.ndarray:
    rng = np.random.default_rng(variant)
    return rng.integers(0, 256, (count, SIZES[variant], SIZES[variant], 3)).astype(np.uint8)


def _features_and_logits(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, ...]:
    both = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])
    features, logits = both(lite.preprocess_input(images), training=False)
    return np.asarray(features), np.asarray(logits)


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_parameter_count_matches_checkpoint(imagenet_model, variant):
    assert imagenet_model(variant).count_params() == PARAMS[variant]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_block_outputs_follow_the_architecture(imagenet_model, variant):
    model = imagenet_model(variant)
    size = SIZES[variant]
    expected = []
    for repeats, channels, reduction in zip(REPEATS[variant], CHANNELS[variant], STAGE_REDUCTION):
        side = size
        for _ in range(int(math.log2(reduction))):
            side = math.ceil(side / 2)  # 'same' padding: ceil(n / stride)
        expected += [(None, side, side, channels)] * repeats
    names = [f"block{i:02d}_out" for i in range(len(expected))]
    assert [tuple(model.get_layer(n).output.shape) for n in names] == expected
    assert not any(layer.name == f"block{len(expected):02d}_out" for layer in model.layers)
    # The registry's fine-tuning boundaries are exactly these layers.
    assert get_backbone(f"efficientnet_lite{variant}").blocks == tuple(names)
    assert get_backbone(f"efficientnet_lite{variant}").input_size == size
    final_side = expected[-1][1]
    assert model.get_layer("top_activation").output.shape == (None, final_side, final_side, 1280)
    assert model.get_layer("avg_pool").output.shape == (None, 1280)
    assert model.output.shape == (None, 1000)


def test_block_specs_scale_lite2_channels():
    specs = lite.block_specs(1.1, 1.2)
    assert len(specs) == 21 and specs[0].filters_in == lite.STEM_FILTERS
    assert sorted({s.filters_out for s in specs}) == sorted(CHANNELS[2])
    assert [s.residual for s in specs[:4]] == [False, False, True, True]


# ----------------------------------------------------------------------------------------------
# Real weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_matches_reference_outputs(imagenet_model, variant):
    path = REFERENCE_DIR / f"efficientnet_lite{variant}.npz"
    if not path.is_file():
        pytest.skip(f"reference outputs not found: {path} (the shared folder beside the checkout)")
    reference = np.load(path)
    features, logits = _features_and_logits(imagenet_model(variant), reference["images"])
    assert np.abs(features - reference["features"]).max() < TOLERANCE
    assert np.abs(logits - reference["logits"]).max() < TOLERANCE
    np.testing.assert_array_equal(logits.argmax(1), reference["logits"].argmax(1))


def test_imagenet_classifier_is_the_models_head(imagenet_model):
    kernel, bias = lite_weights.imagenet_classifier(0)
    assert kernel.shape == (1280, 1000) and bias.shape == (1000,)
    assert kernel.dtype == np.float32 and kernel.flags.c_contiguous
    dense_kernel, dense_bias = imagenet_model(0).get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, dense_kernel)
    np.testing.assert_array_equal(bias, dense_bias)


def test_headless_pooled_build_converts_once_then_uses_cache(
    imagenet_model, tmp_path, monkeypatch
):
    reference = imagenet_model(0)  # built first: no test order may leave it to be built below
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / "efficientnet-lite0-57934424_keras1_notop.weights.h5"
    assert lite_weights.cached_weights_path(0, include_top=False) == cached

    first = lite.EfficientNetLite0(include_top=False, pooling="avg")
    assert cached.is_file()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary left
    stamp = cached.stat().st_mtime_ns

    def no_conversion(path):
        raise AssertionError("the checkpoint was read again despite the cache")

    monkeypatch.setattr(lite_weights, "load_legacy_checkpoint", no_conversion)
    second = lite.EfficientNetLite0(include_top=False, pooling="avg")
    assert cached.stat().st_mtime_ns == stamp

    images = lite.preprocess_input(_images(0))
    pooled = np.asarray(second(images, training=False))
    assert pooled.shape == (2, 1280)
    np.testing.assert_array_equal(pooled, np.asarray(first(images, training=False)))
    features, _ = _features_and_logits(reference, _images(0))
    np.testing.assert_allclose(pooled, features, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Random weights, weight files, argument checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras saving
def test_random_build_and_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    model = lite.EfficientNetLite0(
        weights=None, include_top=False, pooling="max", input_shape=(64, 64, 3)
    )
    assert model.output.shape == (None, 1280)
    assert model.get_layer("block15_out").output.shape == (None, 2, 2, 320)
    assert not (tmp_path / "home").exists()  # random weights touch no cache

    path = tmp_path / "random.weights.h5"
    model.save_weights(str(path))
    again = lite.EfficientNetLite0(
        weights=str(path), include_top=False, pooling="max", input_shape=(64, 64, 3)
    )
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)

    inputs = keras.Input((48, 48, 3))
    head = lite.EfficientNetLite0(weights=None, classes=2, input_tensor=inputs)
    assert head.input is inputs and head.output.shape == (None, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "no/such/file.weights.h5"}, "Received: weights="),
        ({"classes": 2}, "Received: classes=2"),
        ({"include_top": False, "pooling": "sum"}, "Received: pooling='sum'"),
        ({"classifier_activation": "relu"}, "Received: classifier_activation='relu'"),
        ({"input_shape": (16, 16, 3)}, "Received: input_shape="),
        ({"input_shape": (64, 64, 1)}, "Received: input_shape="),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lite.EfficientNetLite0(**kwargs)


def test_checkpoint_path_rejects_unknown_variant():
    with pytest.raises(ValueError, match="Received: variant=3"):
        lite_weights.checkpoint_path(3)


def test_every_architecture_variant_has_a_checkpoint():
    assert tuple(sorted(lite._VARIANTS)) == lite_weights.CHECKPOINT_VARIANTS


def test_preprocess_input_numpy_and_tensor():
    pixels = np.array([[0, 127, 255]], dtype=np.uint8)
    out = lite.preprocess_input(pixels)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]])
    tensor = lite.preprocess_input(keras.ops.convert_to_tensor(pixels))
    assert not isinstance(tensor, np.ndarray)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tensor), out)


# ----------------------------------------------------------------------------------------------
# Checkpoint <-> layer pairing
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lite0():
    return lite.EfficientNetLite0(weights=None, input_shape=(32, 32, 3))


def test_key_without_layer_is_an_error(random_lite0, lite0_state):
    state = dict(lite0_state, **{"_blocks.16._bn1.weight": np.zeros(320, np.float32)})
    before = random_lite0.get_layer("stem_conv").get_weights()[0].copy()
    with pytest.raises(
        lite_weights.CheckpointMismatchError, match=r"without a layer.*_blocks\.16\."
    ):
        lite_weights.load_torch_state(random_lite0, state)
    # Nothing is assigned when the pairing fails.
    np.testing.assert_array_equal(random_lite0.get_layer("stem_conv").get_weights()[0], before)


def test_layer_without_weights_is_an_error(random_lite0, lite0_state):
    state = {k: v for k, v in lite0_state.items() if not k.startswith("_blocks.3._bn1.")}
    with pytest.raises(
        lite_weights.CheckpointMismatchError, match=r"layer block03_bn has no checkpoint"
    ):
        lite_weights.load_torch_state(random_lite0, state)


def test_headless_model_rejects_classifier_unless_ignored(lite0_state):
    model = lite.EfficientNetLite0(weights=None, include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(lite_weights.CheckpointMismatchError, match=r"_fc\.weight"):
        lite_weights.load_torch_state(model, lite0_state)
    lite_weights.load_torch_state(model, lite0_state, ignore_prefixes=("_fc.",))
    np.testing.assert_array_equal(
        model.get_layer("block00_dwconv").get_weights()[0],
        lite0_state["_blocks.0._depthwise_conv.weight"].transpose(2, 3, 0, 1),
    )
