"""detectron2's ROIPooler with the plugin's RoI ops (paper Table 2c) as its per-level ops.

Level assignment (FPN eq. 1), the RoI format and the forward pass are detectron2's own
``ROIPooler``; only ``level_poolers`` change, to any op of ``ROI_OP_REGISTRY``, chosen per
branch from ``MODEL.MRCNN.ROI_OP`` (see mrcnn_plugin/config.py).
"""

import functools
from typing import Callable, Dict, List, Sequence, Tuple, Union

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from mrcnn_plugin.layers.registry import ROI_OP_REGISTRY

__all__ = [
    "MultiLevelRoIPooler",
    "roi_op_of_head",
    "roi_op_from_config",
    "build_pooler_from_config",
]

RoIOpFactory = Callable[[Tuple[int, int], float], nn.Module]
# A head's config node -> its override node under MODEL.MRCNN.ROI_OP.
_BRANCHES = {"ROI_BOX_HEAD": "BOX", "ROI_MASK_HEAD": "MASK", "ROI_KEYPOINT_HEAD": "KEYPOINT"}
_FIELDS = ("NAME", "ALIGNED", "AGGREGATION")


class MultiLevelRoIPooler(ROIPooler):
    """``ROIPooler`` whose op at each level is ``roi_op(output_size, scale)``.

    ``forward(x, box_lists)`` is ROIPooler's: L feature maps (N, C, H_l, W_l) and N ``Boxes``
    -> (M, C, out, out), rows in the order of the concatenated boxes. It keeps box counts
    dynamic under ``torch.jit.trace`` (the plugin's export relies on it).
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
            output_size, scales, canonical_box_size, canonical_level: as detectron2's ROIPooler.
            roi_op: factory called as ``roi_op(output_size, scale)`` once per level, e.g.
                ``functools.partial(MRCNNRoIAlign, sampling_ratio=0, aligned=True)``.
        """
        # detectron2 checks the scales and derives the levels; its ops are then replaced.
        super().__init__(output_size, scales, 0, "ROIAlignV2", canonical_box_size, canonical_level)
        self.level_poolers = nn.ModuleList(roi_op(self.output_size, s) for s in scales)


def roi_op_of_head(cfg, head_key: str) -> CfgNode:
    """{NAME, ALIGNED, AGGREGATION} of a branch's op, e.g. for "ROI_MASK_HEAD": the values of
    MODEL.MRCNN.ROI_OP.MASK that are not None, MODEL.MRCNN.ROI_OP's for the others."""
    op_cfg = cfg.MODEL.MRCNN.ROI_OP
    override = op_cfg[_BRANCHES[head_key]]
    return CfgNode({f: op_cfg[f] if override[f] is None else override[f] for f in _FIELDS})


def roi_op_from_config(cfg, head_key: str) -> RoIOpFactory:
    """The per-level op factory of the branch ``cfg.MODEL[head_key]``.

    ``functools.partial(ROI_OP_REGISTRY.get(NAME), sampling_ratio=, aligned=, aggregation=)``
    with the head's POOLER_SAMPLING_RATIO and :func:`roi_op_of_head`'s settings. Unsupported
    combinations raise ``ValueError`` here rather than at first use.
    """
    op = roi_op_of_head(cfg, head_key)
    factory = functools.partial(
        ROI_OP_REGISTRY.get(op.NAME),
        sampling_ratio=int(cfg.MODEL[head_key].POOLER_SAMPLING_RATIO),
        aligned=bool(op.ALIGNED),
        aggregation=op.AGGREGATION,
    )
    factory(1, 1.0)  # fail fast on bad settings
    return factory


def build_pooler_from_config(
    cfg, head_key: str, input_shape: Dict[str, ShapeSpec], in_features: List[str]
) -> MultiLevelRoIPooler:
    """The pooler of branch ``cfg.MODEL[head_key]`` (e.g. "ROI_BOX_HEAD"): its
    POOLER_RESOLUTION, the op of :func:`roi_op_from_config`, the strides of ``in_features``."""
    op_cfg = cfg.MODEL.MRCNN.ROI_OP
    return MultiLevelRoIPooler(
        output_size=cfg.MODEL[head_key].POOLER_RESOLUTION,
        scales=[1.0 / input_shape[f].stride for f in in_features],
        roi_op=roi_op_from_config(cfg, head_key),
        canonical_box_size=op_cfg.CANONICAL_BOX_SIZE,
        canonical_level=op_cfg.CANONICAL_LEVEL,
    )
