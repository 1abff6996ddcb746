"""ResNet / ResNeXt building blocks: the stem, residual blocks and whole stages.

Module and attribute names (``conv1``, ``conv2``, ``conv3``, ``shortcut``, each a detectron2
``Conv2d`` holding its ``norm``) are chosen so that state_dicts use detectron2's key names and
model-zoo checkpoints load unchanged. Every block subclasses ``CNNBlockBase`` so it carries
``in_channels`` / ``out_channels`` / ``stride`` and a ``freeze()`` that turns BN into FrozenBN.
"""

from typing import List, Optional, Union

import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, get_norm
from torch import nn

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "BasicStem",
    "make_stage",
    "make_res5_stage",
    "res5_stage_kwargs_from_config",
]

NormSpec = Union[str, None]


def _msra_init(conv: nn.Conv2d) -> None:
    """He (MSRA) init used by the Caffe2 ResNets: normal, fan_out, ReLU gain; zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv_norm(
    in_channels: int, out_channels: int, kernel_size: int, norm: NormSpec, **kwargs
) -> Conv2d:
    """A bias-free conv followed by ``norm`` (the norm lives at ``<conv>.norm``)."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        bias=False,
        norm=get_norm(norm, out_channels),
        **kwargs,
    )
    _msra_init(conv)
    return conv


def _projection(in_channels: int, out_channels: int, stride: int, norm: NormSpec):
    """1x1 projection shortcut, only needed when the channel count changes."""
    if in_channels == out_channels:
        return None
    return _conv_norm(in_channels, out_channels, 1, norm, stride=stride)


class BasicStem(CNNBlockBase):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max-pool: (N,C,H,W) -> (N,C',H/4,W/4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: NormSpec = "BN"):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = _conv_norm(in_channels, out_channels, 7, norm, stride=2, padding=3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BasicBlock(CNNBlockBase):
    """Two 3x3 convs (ResNet-18/34). The stride sits in the first conv and in the shortcut.

    (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm="BN"):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = _projection(in_channels, out_channels, stride, norm)
        self.conv1 = _conv_norm(in_channels, out_channels, 3, norm, stride=stride, padding=1)
        self.conv2 = _conv_norm(out_channels, out_channels, 3, norm, stride=1, padding=1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class BottleneckBlock(CNNBlockBase):
    """1x1 reduce, 3x3 (grouped for ResNeXt, optionally dilated), 1x1 expand (ResNet-50+).

    ``stride_in_1x1`` puts the stride on the first 1x1 conv (original MSRA / Caffe2 R-50
    weights) instead of the 3x3 conv (torchvision / ResNeXt weights). The 3x3 conv pads by
    ``dilation`` so the spatial size only depends on the stride.

    (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: NormSpec = "BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = _projection(in_channels, out_channels, stride, norm)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv_norm(in_channels, bottleneck_channels, 1, norm, stride=stride_1x1)
        self.conv2 = _conv_norm(
            bottleneck_channels,
            bottleneck_channels,
            3,
            norm,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
        )
        self.conv3 = _conv_norm(bottleneck_channels, out_channels, 1, norm)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


def make_stage(
    block_class, num_blocks: int, *, in_channels: int, out_channels: int, first_stride: int, **kw
) -> List[CNNBlockBase]:
    """``num_blocks`` blocks of ``block_class``; only the first one strides / changes channels.

    ``kw`` (norm, bottleneck_channels, num_groups, dilation, ...) is passed to every block.
    """
    blocks = []
    for i in range(num_blocks):
        stride = first_stride if i == 0 else 1
        blocks.append(block_class(in_channels, out_channels, stride=stride, **kw))
        in_channels = out_channels
    return blocks


def make_res5_stage(
    in_channels: int = 1024,
    out_channels: int = 2048,
    *,
    first_stride: int = 2,
    dilation: int = 1,
    norm: NormSpec = "FrozenBN",
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = True,
    bottleneck_channels: Optional[int] = None,
    num_blocks: int = 3,
) -> nn.Sequential:
    """The res5 stage run on pooled RoI features by a C4 box/mask head.

    Children are named "0", "1", "2" (bottleneck blocks with conv1/conv2/conv3 and, for the
    first, a shortcut), so under ``roi_heads.res5`` the keys match detectron2's checkpoints.

    Args:
        first_stride: 2 is detectron2's design (14x14 RoI features -> 7x7); 1 is the paper's
            Fig. 4 variant (7x7 RoI features stay 7x7).
        bottleneck_channels: defaults to ``num_groups * width_per_group * 8``, the res5
            width that detectron2 derives from the ResNeXt settings.

    Returns:
        nn.Sequential mapping (R, in_channels, S, S) -> (R, out_channels, S/first_stride, ...).
    """
    if bottleneck_channels is None:
        bottleneck_channels = num_groups * width_per_group * 8
    blocks = make_stage(
        BottleneckBlock,
        num_blocks,
        in_channels=in_channels,
        out_channels=out_channels,
        first_stride=first_stride,
        bottleneck_channels=bottleneck_channels,
        num_groups=num_groups,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        dilation=dilation,
    )
    return nn.Sequential(*blocks)


def res5_stage_kwargs_from_config(cfg) -> dict:
    """``make_res5_stage`` keyword arguments from detectron2's ``MODEL.RESNETS`` keys.

    Channels follow detectron2's Res5ROIHeads (res5 out = 8 x RES2_OUT_CHANNELS, in = half);
    ``first_stride`` comes from ``MODEL.MRCNN.RES5_FIRST_STRIDE`` when that key exists.
    """
    r = cfg.MODEL.RESNETS
    out_channels = r.RES2_OUT_CHANNELS * 8
    mrcnn = cfg.MODEL.get("MRCNN", None)
    first_stride = mrcnn.get("RES5_FIRST_STRIDE", 2) if mrcnn is not None else 2
    return {
        "in_channels": out_channels // 2,
        "out_channels": out_channels,
        "first_stride": first_stride,
        "norm": r.NORM,
        "num_groups": r.NUM_GROUPS,
        "width_per_group": r.WIDTH_PER_GROUP,
        "stride_in_1x1": r.STRIDE_IN_1X1,
    }
