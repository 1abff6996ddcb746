"""ResNet / ResNeXt (+FPN) backbones. Importing this package registers, in detectron2's
BACKBONE_REGISTRY, "MRCNNResNet" (C4 / DC5 / C5) and "MRCNNResNetFPN" (P2-P6)."""

from .fpn import MaxPoolTopBlock, MRCNNResNetFPN
from .resnet import BLOCKS_PER_STAGE, MRCNNResNet
from .resnet_blocks import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    make_res5_stage,
    make_stage,
    res5_stage_kwargs_from_config,
)

__all__ = [
    "BLOCKS_PER_STAGE",
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "MRCNNResNet",
    "MRCNNResNetFPN",
    "MaxPoolTopBlock",
    "make_res5_stage",
    "make_stage",
    "res5_stage_kwargs_from_config",
]
