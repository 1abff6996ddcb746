"""Multi-level RoI pooling over a feature pyramid, using the plugin's RoI ops.

:class:`MultiLevelRoIPooler` is a drop-in replacement for detectron2's ``ROIPooler`` (the ROI
heads only call it), but the per-level op is any callable ``(output_size, spatial_scale) ->
nn.Module`` instead of a fixed string, so RoIAlign / RoIPool / RoIWarp and their variants
(paper Table 2c) plug in from the config through ``ROI_OP_REGISTRY``.
"""

import functools
import math
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes
from torch import nn

from mrcnn_plugin.layers.registry import ROI_OP_REGISTRY

__all__ = [
    "MultiLevelRoIPooler",
    "assign_boxes_to_levels",
    "boxes_to_rois",
    "roi_op_from_config",
    "build_pooler_from_config",
]

RoIOpFactory = Callable[[Tuple[int, int], float], nn.Module]

# Keeps log2 finite for degenerate boxes; the same value detectron2 uses, so the level
# assignment (and hence pooled features) are identical to detectron2's ROIPooler.
_LOG_EPS = 1e-8


def assign_boxes_to_levels(
    box_lists: List[Boxes],
    min_level: int,
    max_level: int,
    canonical_box_size: float,
    canonical_level: int,
) -> torch.Tensor:
    """FPN paper eq. 1: k = floor(k0 + log2(sqrt(w * h) / canonical_box_size)), clamped.

    Args:
        box_lists: N ``Boxes``, one per image, in image coordinates.
        min_level, max_level: pyramid levels available (level k has stride 2**k).
        canonical_box_size, canonical_level: a box of this size goes to this level.

    Returns:
        (M,) int64 tensor over the concatenated boxes: level index minus ``min_level``, i.e.
        the position in the list of feature maps.
    """
    sizes = torch.sqrt(torch.cat([boxes.area() for boxes in box_lists]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + _LOG_EPS))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def boxes_to_rois(box_lists: List[Boxes]) -> torch.Tensor:
    """Concatenates N ``Boxes`` into (M, 5) rois ``[image_index, x0, y0, x1, y1]``."""
    boxes = torch.cat([b.tensor for b in box_lists], dim=0)
    # The index column is built from each box tensor (not from len()), so that a traced
    # model keeps the number of boxes per image dynamic.
    index = [torch.full_like(b.tensor[:, :1], i) for i, b in enumerate(box_lists)]
    return torch.cat([torch.cat(index, dim=0), boxes], dim=1)


def _level_of_scale(scale: float) -> int:
    level = -math.log2(scale)
    if not math.isclose(level, round(level)):
        raise ValueError(f"Feature stride 1/{scale} is not a power of 2")
    return int(round(level))


class MultiLevelRoIPooler(nn.Module):
    """Pools each box from the pyramid level its size selects (FPN), or from the only map.

    ``forward(x, box_lists)``: x is a list of L feature maps (N, C, H_l, W_l) ordered like
    ``scales``; box_lists holds N ``Boxes`` in image coordinates. Returns (M, C, out_h, out_w),
    M = total number of boxes, rows in the order of the concatenated box lists.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        scales: Sequence[float],
        roi_op: RoIOpFactory,
        canonical_box_size: float = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            output_size: int or (out_h, out_w).
            scales: 1 / stride of each level, finest first; consecutive levels must differ by
                a factor of 2 (a pyramid), as in detectron2.
            roi_op: factory called as ``roi_op(output_size, scale)`` once per level, e.g.
                ``functools.partial(RoIAlign, sampling_ratio=0, aligned=True)``.
            canonical_box_size, canonical_level: FPN level assignment (see
                :func:`assign_boxes_to_levels`).
        """
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(int(s) for s in output_size)
        if len(self.output_size) != 2:
            raise ValueError(f"output_size must be an int or (h, w); got {output_size!r}")
        if len(scales) == 0:
            raise ValueError("MultiLevelRoIPooler needs at least one scale")
        levels = [_level_of_scale(s) for s in scales]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"Scales {list(scales)} do not form a pyramid (levels {levels})")
        if canonical_box_size <= 0:
            raise ValueError(f"canonical_box_size must be > 0; got {canonical_box_size}")
        self.min_level = levels[0]
        self.max_level = levels[-1]
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.level_poolers = nn.ModuleList(roi_op(self.output_size, s) for s in scales)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        if len(x) != len(self.level_poolers):
            raise ValueError(
                f"Expected {len(self.level_poolers)} feature maps (one per scale), got {len(x)}"
            )
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(
                f"Got {len(box_lists)} box lists for a batch of {x[0].shape[0]} images"
            )
        num_channels = x[0].shape[1]
        if len(box_lists) == 0:
            return x[0].new_zeros((0, num_channels) + self.output_size)

        rois = boxes_to_rois(box_lists)
        if len(self.level_poolers) == 1:
            return self.level_poolers[0](x[0], rois)

        level_of_box = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        output = x[0].new_zeros((rois.shape[0], num_channels) + self.output_size)
        for level, pooler in enumerate(self.level_poolers):
            inds = torch.nonzero(level_of_box == level).squeeze(1)
            # index_put_ rather than output[inds] = ...: the advanced-indexing assignment
            # has had autograd/export problems (pytorch issue 49852).
            output.index_put_((inds,), pooler(x[level], rois[inds]))
        return output

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, levels=[{self.min_level}, {self.max_level}], "
            f"canonical_box_size={self.canonical_box_size}, "
            f"canonical_level={self.canonical_level}"
        )


def roi_op_from_config(cfg, sampling_ratio: int) -> RoIOpFactory:
    """Per-level op factory from ``cfg.MODEL.MRCNN.ROI_OP`` (NAME, ALIGNED, AGGREGATION).

    Returns ``functools.partial(cls, sampling_ratio=, aligned=, aggregation=)`` where ``cls``
    is ``ROI_OP_REGISTRY.get(NAME)``; calling it with (output_size, spatial_scale) builds
    the op. Unsupported combinations raise ``ValueError`` here rather than at first use.
    """
    op_cfg = cfg.MODEL.MRCNN.ROI_OP
    cls = ROI_OP_REGISTRY.get(op_cfg.NAME)
    factory = functools.partial(
        cls,
        sampling_ratio=int(sampling_ratio),
        aligned=bool(op_cfg.ALIGNED),
        aggregation=op_cfg.AGGREGATION,
    )
    factory(1, 1.0)  # fail fast on bad settings
    return factory


def build_pooler_from_config(
    cfg, head_key: str, input_shape: Dict[str, ShapeSpec], in_features: List[str]
) -> MultiLevelRoIPooler:
    """The pooler for head ``cfg.MODEL[head_key]`` (e.g. "ROI_BOX_HEAD", "ROI_MASK_HEAD").

    Resolution and sampling ratio come from that head's POOLER_RESOLUTION and
    POOLER_SAMPLING_RATIO (its POOLER_TYPE is not used: the op is MODEL.MRCNN.ROI_OP.NAME);
    scales from the strides of ``in_features`` in ``input_shape``.
    """
    head_cfg = cfg.MODEL[head_key]
    op_cfg = cfg.MODEL.MRCNN.ROI_OP
    return MultiLevelRoIPooler(
        output_size=head_cfg.POOLER_RESOLUTION,
        scales=[1.0 / input_shape[f].stride for f in in_features],
        roi_op=roi_op_from_config(cfg, head_cfg.POOLER_SAMPLING_RATIO),
        canonical_box_size=op_cfg.CANONICAL_BOX_SIZE,
        canonical_level=op_cfg.CANONICAL_LEVEL,
    )
