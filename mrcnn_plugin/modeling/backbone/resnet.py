"""The ResNet / ResNeXt backbone (C4, DC5 and C5 variants), registered as "MRCNNResNet".

State-dict keys equal detectron2's (``stem.conv1.*``, ``res2.0.conv1.*``, ...,
``res5.2.conv3.*``), so model-zoo checkpoints for ``build_resnet_backbone`` load as-is.
"""

from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .resnet_blocks import BasicBlock, BasicStem, BottleneckBlock, make_stage

__all__ = ["MRCNNResNet", "BLOCKS_PER_STAGE"]

# Number of residual blocks in res2..res5 for each supported depth.
BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# How many residual stages must exist to produce a feature.
_STAGES_NEEDED = {"stem": 0, "res2": 1, "res3": 2, "res4": 3, "res5": 4}


@BACKBONE_REGISTRY.register()
class MRCNNResNet(Backbone):
    """ResNet-18/34/50/101/152 and ResNeXt, returning a dict of the requested features.

    Only the stages up to the deepest requested feature are built (a C4 backbone has no
    res5; that stage lives in the RoI head), exactly as detectron2 does, so the parameter
    sets agree. Construct with keyword arguments or as ``MRCNNResNet(cfg, input_shape)``.
    """

    @configurable
    def __init__(
        self,
        *,
        depth: int = 50,
        in_channels: int = 3,
        out_features: Sequence[str] = ("res4",),
        norm: Optional[str] = "FrozenBN",
        freeze_at: int = 0,
        num_groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = True,
        res5_dilation: int = 1,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
    ):
        """
        Args:
            depth: 18 or 34 (BasicBlock) or 50, 101, 152 (BottleneckBlock).
            in_channels: channels of the input image (``input_shape.channels``).
            out_features: any of "stem", "res2", "res3", "res4", "res5".
            norm: a detectron2 ``get_norm`` name: "FrozenBN", "BN", "SyncBN", "GN" or "".
            freeze_at: 0 freezes nothing, 1 the stem, k >= 2 the stem and res2..res<k>
                (detectron2's MODEL.BACKBONE.FREEZE_AT).
            num_groups, width_per_group: ResNeXt cardinality and per-group width of res2's
                3x3 conv (1 and 64 give a plain ResNet).
            stride_in_1x1: stride on the first 1x1 conv of a bottleneck instead of the 3x3.
            res5_dilation: 1, or 2 for DC5 (res5 keeps stride 16, 3x3 convs dilated by 2).
            stem_out_channels, res2_out_channels: widths; later stages double the latter.
        """
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}: {depth}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        unknown = [f for f in out_features if f not in _STAGES_NEEDED]
        if unknown or not out_features:
            raise ValueError(
                f"out_features must be a non-empty subset of "
                f"{list(_STAGES_NEEDED)}, got {list(out_features)}"
            )
        basic = depth < 50
        if basic and (res2_out_channels != 64 or num_groups != 1 or res5_dilation != 1):
            raise ValueError(
                "ResNet-18/34 need res2_out_channels=64, num_groups=1 and res5_dilation=1"
            )

        self.stem = BasicStem(in_channels, stem_out_channels, norm)
        self._out_feature_strides: Dict[str, int] = {"stem": self.stem.stride}
        self._out_feature_channels: Dict[str, int] = {"stem": stem_out_channels}

        num_stages = max(_STAGES_NEEDED[f] for f in out_features)
        stage_names, stride, channels = [], self.stem.stride, stem_out_channels
        for idx in range(num_stages):
            name = f"res{idx + 2}"
            dilation = res5_dilation if name == "res5" else 1
            # res2 follows the stem's max-pool; a dilated res5 trades its stride for dilation.
            first_stride = 1 if idx == 0 or dilation > 1 else 2
            out_channels = res2_out_channels * 2**idx
            if basic:
                kwargs = {"block_class": BasicBlock}
            else:
                kwargs = {
                    "block_class": BottleneckBlock,
                    "bottleneck_channels": num_groups * width_per_group * 2**idx,
                    "num_groups": num_groups,
                    "stride_in_1x1": stride_in_1x1,
                    "dilation": dilation,
                }
            blocks = make_stage(
                num_blocks=BLOCKS_PER_STAGE[depth][idx],
                in_channels=channels,
                out_channels=out_channels,
                first_stride=first_stride,
                norm=norm,
                **kwargs,
            )
            self.add_module(name, nn.Sequential(*blocks))
            stage_names.append(name)
            stride *= first_stride
            channels = out_channels
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = channels

        self.stage_names = tuple(stage_names)
        self._out_features = list(out_features)
        self.freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        r = cfg.MODEL.RESNETS
        channels = input_shape.channels if input_shape is not None else 3
        return {
            "depth": r.DEPTH,
            "in_channels": channels,
            "out_features": list(r.OUT_FEATURES),
            "norm": r.NORM,
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "num_groups": r.NUM_GROUPS,
            "width_per_group": r.WIDTH_PER_GROUP,
            "stride_in_1x1": r.STRIDE_IN_1X1,
            "res5_dilation": r.RES5_DILATION,
            "stem_out_channels": r.STEM_OUT_CHANNELS,
            "res2_out_channels": r.RES2_OUT_CHANNELS,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C, H, W) image batch -> {name: (N, channels[name], H/stride, W/stride)}."""
        if x.dim() != 4:
            raise ValueError(f"MRCNNResNet expects an (N, C, H, W) tensor, got {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0) -> "MRCNNResNet":
        """Stops training the stem (``freeze_at >= 1``) and res2..res<freeze_at>.

        Frozen parameters get ``requires_grad=False`` and their BatchNorms become
        FrozenBatchNorm2d (``CNNBlockBase.freeze``), so batch statistics stay fixed too.
        """
        if freeze_at >= 1:
            self.stem.freeze()
        for stage_number, name in enumerate(self.stage_names, start=2):
            if freeze_at >= stage_number:
                for block in getattr(self, name).children():
                    block.freeze()
        return self
