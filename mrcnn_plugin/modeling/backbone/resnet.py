"""The ResNet / ResNeXt backbone registered as "MRCNNResNet": C4 (``res4``), DC5
(``RES5_DILATION: 2``) or C5 (``res5``), as ``MODEL.RESNETS`` says.

It is detectron2's ``ResNet``, built from the stem and stages that detectron2's own
``build_resnet_backbone`` derives from the cfg, so keys (``stem.conv1.*``, ``res2.0.conv1.*``)
and outputs equal the built-in backbone's and model-zoo checkpoints load unchanged.
"""

from typing import Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone

__all__ = ["MRCNNResNet"]


@BACKBONE_REGISTRY.register()
class MRCNNResNet(ResNet):
    """Called as ``ResNet`` (stem, stages, out_features, freeze_at) or as ``(cfg, input_shape)``."""

    __init__ = configurable(ResNet.__init__)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is None:
            input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
        # Depth, widths, ResNeXt groups, norm and the DC5 dilation are detectron2's arithmetic;
        # only the needed stages exist (a C4 backbone has no res5: it lives in the RoI head).
        reference = build_resnet_backbone(cfg, input_shape)
        return {
            "stem": reference.stem,
            "stages": [list(stage) for stage in reference.stages],
            "out_features": list(cfg.MODEL.RESNETS.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        }
