"""Fine-tuning's network: block cuts per backbone, the frozen bottom, the early-stopping rows.

Random-weight backbones at small sizes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dogscats.backbones import build_backbone, get_backbone
from dogscats.finetune import model, trainer

try:  # two shared cores: keep TensorFlow from spreading wider
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
except RuntimeError:  # TensorFlow already started by another test module
    pass


# ----------------------------------------------------------------------------------------------
# Block cuts
# ----------------------------------------------------------------------------------------------

# backbone: {blocks: (layer feeding the cut, or the cut itself; a first layer of the top)}
CUTS = {
    "resnet50": {1: ("conv5_block2_out", "conv5_block3_1_conv"), 2: ("conv5_block1_out", None)},
    "inception_v3": {1: ("mixed9", None), 2: ("mixed8", None)},
    "xception": {1: ("block13_pool", "block14_sepconv1"), 2: ("block12_sepconv3_bn", None)},
    "efficientnet_lite0": {1: ("block14_out", "block15_expand_conv"), 2: ("block13_out", None)},
}


@pytest.mark.parametrize("name", sorted(CUTS))
def test_block_cut_gives_a_trainable_top_that_completes_the_network(name):
    spec = get_backbone(name)
    net = build_backbone(name, weights="random", input_size=spec.min_size, pooling=None)
    x = np.random.default_rng(0).uniform(-1, 1, (1, spec.min_size, spec.min_size, 3))
    full = np.asarray(net(x.astype("float32"), training=False))
    for blocks, (marker, first) in CUTS[name].items():
        cut = model.cut_backbone(net, spec, blocks)
        end = net.get_layer(cut.layer)
        # The cut is the registry's layer itself, or the unnamed Add it alone feeds (Xception).
        assert cut.layer == marker or (
            isinstance(end, keras.layers.Add)
            and marker in [t._keras_history.operation.name for t in end.input]
        )
        if first:
            assert first in cut.first_layers
        top_names = {layer.name for layer in cut.top.layers[1:]}
        assert top_names.isdisjoint(layer.name for layer in cut.bottom.layers)
        assert cut.top.trainable_weights and not cut.bottom.trainable_weights
        maps = cut.bottom(x.astype("float32"), training=False)
        np.testing.assert_allclose(cut.top(maps, training=False), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="BLOCKS must be between 1 and"):
        model.cut_backbone(net, spec, len(spec.blocks))


def test_bottom_stays_frozen_and_batchnorm_in_inference_mode():
    """augment="full": the whole network is in the model; only the top's weights may move."""
    spec = get_backbone("efficientnet_lite0")
    net = build_backbone("efficientnet_lite0", weights="random", input_size=32, pooling=None)
    cut = model.cut_backbone(net, spec, 1)
    ft = model.build_model(cut, "efficientnet_lite0", "full", (32, 32, 3), dropout=0.0)
    model.compile_model(ft.model, 1e-2, steps=2, epochs=1)
    bottom, top = cut.bottom.get_weights(), cut.top.get_weights()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 1, 32, 32, 3)).astype("float32")
    ft.model.fit(x, rng.integers(0, 2, (8, 1)).astype("float32"), batch_size=4, verbose=0)
    for before, after in zip(bottom, cut.bottom.get_weights()):
        np.testing.assert_array_equal(before, after)
    moved = [not np.array_equal(b, a) for b, a in zip(top, cut.top.get_weights())]
    assert any(moved)
    for layer in cut.top.layers:  # moving statistics untouched: BatchNorm never saw a batch
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, var = layer.moving_mean, layer.moving_variance
            np.testing.assert_array_equal(np.asarray(mean), np.zeros(mean.shape))
            np.testing.assert_array_equal(np.asarray(var), np.ones(var.shape))


def test_early_stopping_rows_are_a_stratified_share_of_the_training_rows():
    y = np.array([0] * 60 + [1] * 40)
    folds = np.arange(100) % 5
    train_rows = np.flatnonzero(folds != 0)  # 80 rows: 48 cats, 32 dogs
    fit, stop = trainer.early_stopping_split(train_rows, y, 0.15, seed=7)
    assert len(stop) == 12 and y[stop].sum() == round(12 * 32 / 80)
    assert np.array_equal(np.sort(np.concatenate([fit, stop])), train_rows)
    assert not set(stop) & set(np.flatnonzero(folds == 0))  # the scored fold is never used
    again = trainer.early_stopping_split(train_rows, y, 0.15, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((fit, stop), again, strict=True))
    tiny = trainer.early_stopping_split(np.arange(6), np.array([0, 0, 0, 1, 1, 1]), 0.15, 1)
    assert sorted(np.array([0, 0, 0, 1, 1, 1])[tiny[1]]) == [0, 1]  # both classes, even here
