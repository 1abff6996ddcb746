"""Backbones on detectron2's ResNet / FPN. Importing this package registers, in detectron2's
BACKBONE_REGISTRY, "MRCNNResNet" (C4 / DC5 / C5) and "MRCNNResNetFPN" (P2-P6)."""

from .fpn import MRCNNResNetFPN
from .res5_stage import make_res5_stage, res5_stage_kwargs_from_config
from .resnet import MRCNNResNet

__all__ = ["MRCNNResNet", "MRCNNResNetFPN", "make_res5_stage", "res5_stage_kwargs_from_config"]
