"""Feature Pyramid Network over the plugin's ResNet, registered as "MRCNNResNetFPN".

P2..P5 come from 1x1 lateral convs on res2..res5 merged top-down (nearest 2x upsampling,
sum or average) and smoothed by 3x3 output convs; P6 subsamples P5 (max-pool, kernel 1,
stride 2) for the RPN's largest anchors. Keys equal detectron2's ``build_resnet_fpn_backbone``:
``bottom_up.*``, ``fpn_lateral{2..5}.*``, ``fpn_output{2..5}.*``.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .resnet import MRCNNResNet

__all__ = ["MRCNNResNetFPN", "MaxPoolTopBlock"]


class MaxPoolTopBlock(nn.Module):
    """Adds one coarser level by subsampling the coarsest FPN output: (N,C,H,W) -> (N,C,H/2,W/2).

    No parameters, so it adds no state-dict keys.
    """

    num_levels = 1

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


def _xavier_init(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" (uniform, fan_in) with zero bias, as used for FPN convs."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


@BACKBONE_REGISTRY.register()
class MRCNNResNetFPN(Backbone):
    """FPN on top of a bottom-up ``Backbone`` (an ``MRCNNResNet`` when built from a cfg).

    Output names are "p<k>" where 2**k is the stride (p2..p6 for res2..res5 + top block).
    """

    @configurable
    def __init__(
        self,
        *,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int = 256,
        norm: Optional[str] = "",
        fuse_type: str = "sum",
        top_block: Optional[nn.Module] = None,
    ):
        """
        Args:
            bottom_up: produces ``in_features``; their strides must double from one to the next.
            in_features: bottom-up feature names, finest first, e.g. ["res2", ..., "res5"].
            out_channels: channels of every pyramid level.
            norm: ``get_norm`` name for lateral/output convs; "" means plain convs with bias.
            fuse_type: "sum" or "avg" of the lateral and the upsampled coarser level.
            top_block: extra coarser levels from the coarsest output (``MaxPoolTopBlock``).
        """
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        if not in_features:
            raise ValueError("in_features must not be empty")
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"bottom-up backbone does not output {missing} (outputs {list(shapes)}); "
                "for a cfg set MODEL.RESNETS.OUT_FEATURES to include MODEL.FPN.IN_FEATURES"
            )
        strides = [shapes[f].stride for f in in_features]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"in_features strides must double level to level: {strides}")

        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self._fuse_type = fuse_type
        self.top_block = top_block
        # Pyramid level k of each input (stride 2**k); conv names carry it, e.g. fpn_lateral2.
        self._levels = [int(math.log2(s)) for s in strides]
        use_bias = not norm
        for level, feature in zip(self._levels, in_features):
            lateral = Conv2d(
                shapes[feature].channels,
                out_channels,
                kernel_size=1,
                bias=use_bias,
                norm=get_norm(norm, out_channels),
            )
            output = Conv2d(
                out_channels,
                out_channels,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, out_channels),
            )
            _xavier_init(lateral)
            _xavier_init(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)

        extra = top_block.num_levels if top_block is not None else 0
        all_levels = self._levels + [self._levels[-1] + i for i in range(1, extra + 1)]
        self._out_features = [f"p{k}" for k in all_levels]
        self._out_feature_strides = {f"p{k}": 2**k for k in all_levels}
        self._out_feature_channels = {f"p{k}": out_channels for k in all_levels}
        # Inputs must split evenly down to the coarsest bottom-up level so that the
        # upsampled maps line up with the laterals.
        self._size_divisibility = strides[-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        return {
            "bottom_up": MRCNNResNet(cfg, input_shape),
            "in_features": list(cfg.MODEL.FPN.IN_FEATURES),
            "out_channels": cfg.MODEL.FPN.OUT_CHANNELS,
            "norm": cfg.MODEL.FPN.NORM,
            "fuse_type": cfg.MODEL.FPN.FUSE_TYPE,
            "top_block": MaxPoolTopBlock(),
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C, H, W), H and W multiples of ``size_divisibility`` ->
        {"p<k>": (N, out_channels, H / 2**k, W / 2**k)}, finest level first."""
        features = self.bottom_up(x)
        outputs: List[torch.Tensor] = []
        merged = None
        # Walk from the coarsest level to the finest, carrying the merged top-down map.
        for level, name in zip(reversed(self._levels), reversed(self.in_features)):
            lateral = getattr(self, f"fpn_lateral{level}")(features[name])
            if merged is None:
                merged = lateral
            else:
                merged = lateral + F.interpolate(merged, scale_factor=2.0, mode="nearest")
                if self._fuse_type == "avg":
                    merged = merged / 2
            outputs.insert(0, getattr(self, f"fpn_output{level}")(merged))
        if self.top_block is not None:
            outputs.extend(self.top_block(outputs[-1]))
        return dict(zip(self._out_features, outputs))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }
