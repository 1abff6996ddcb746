"""The FPN over "MRCNNResNet", registered as "MRCNNResNetFPN": P2..P5 from res2..res5 plus a
max-pooled P6, detectron2's ``FPN`` and ``LastLevelMaxPool`` as ``build_resnet_fpn_backbone``
assembles them (keys ``bottom_up.*``, ``fpn_lateral{2..5}.*``, ``fpn_output{2..5}.*``).
"""

from typing import Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from .resnet import MRCNNResNet

__all__ = ["MRCNNResNetFPN"]


@BACKBONE_REGISTRY.register()
class MRCNNResNetFPN(FPN):
    """Called as ``FPN`` (bottom_up, in_features, out_channels...) or as ``(cfg, input_shape)``."""

    __init__ = configurable(FPN.__init__)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        fpn = cfg.MODEL.FPN
        return {
            "bottom_up": MRCNNResNet(cfg, input_shape),
            "in_features": list(fpn.IN_FEATURES),
            "out_channels": fpn.OUT_CHANNELS,
            "norm": fpn.NORM,
            "top_block": LastLevelMaxPool(),
            "fuse_type": fpn.FUSE_TYPE,
        }
