"""The res5 stage that a C4 head runs on pooled RoI features, with the plugin's choice of its
first stride (``MODEL.MRCNN.RES5_FIRST_STRIDE``): 2 as detectron2's Res5ROIHeads (14x14 RoIs ->
7x7), or 1 as the paper's Fig. 4 (7x7 RoIs stay 7x7). Both have the same parameters.
"""

from typing import Optional

from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from torch import nn

__all__ = ["make_res5_stage", "res5_stage_kwargs_from_config"]


def make_res5_stage(
    in_channels: int = 1024,
    out_channels: int = 2048,
    *,
    first_stride: int = 2,
    dilation: int = 1,
    norm: Optional[str] = "FrozenBN",
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = True,
    bottleneck_channels: Optional[int] = None,
    num_blocks: int = 3,
) -> nn.Sequential:
    """detectron2 bottleneck blocks as children "0", "1", ..., so that under ``roi_heads.res5``
    the keys are Res5ROIHeads'. (R, in_channels, S, S) -> (R, out_channels, S/first_stride, ...).

    ``bottleneck_channels`` defaults to res5's ResNeXt width, ``num_groups * width_per_group * 8``.
    """
    if bottleneck_channels is None:
        bottleneck_channels = num_groups * width_per_group * 8
    blocks = ResNet.make_stage(
        BottleneckBlock,
        num_blocks,
        stride_per_block=[first_stride] + [1] * (num_blocks - 1),
        in_channels=in_channels,
        out_channels=out_channels,
        bottleneck_channels=bottleneck_channels,
        num_groups=num_groups,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        dilation=dilation,
    )
    return nn.Sequential(*blocks)


def res5_stage_kwargs_from_config(cfg) -> dict:
    """``make_res5_stage`` arguments from ``MODEL.RESNETS`` (widths as Res5ROIHeads derives them:
    out = 8 x RES2_OUT_CHANNELS, in = half) and ``MODEL.MRCNN.RES5_FIRST_STRIDE`` (default 2)."""
    r = cfg.MODEL.RESNETS
    mrcnn = cfg.MODEL.get("MRCNN", None)
    out_channels = r.RES2_OUT_CHANNELS * 8
    return {
        "in_channels": out_channels // 2,
        "out_channels": out_channels,
        "first_stride": mrcnn.get("RES5_FIRST_STRIDE", 2) if mrcnn is not None else 2,
        "norm": r.NORM,
        "num_groups": r.NUM_GROUPS,
        "width_per_group": r.WIDTH_PER_GROUP,
        "stride_in_1x1": r.STRIDE_IN_1X1,
    }
