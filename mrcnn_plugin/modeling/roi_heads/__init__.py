"""Mask R-CNN's per-RoI heads. Importing this package registers, in detectron2's registries,
ROI_HEADS: "MRCNNStandardROIHeads" (FPN/DC5/C5), "MRCNNRes5ROIHeads" (C4);
ROI_MASK_HEAD: "MRCNNMaskHead", "MRCNNMLPMaskHead"; ROI_KEYPOINT_HEAD: "MRCNNKeypointHead"."""

from .c4_roi_heads import MRCNNRes5ROIHeads
from .fpn_roi_heads import MRCNNStandardROIHeads
from .keypoint_head import MRCNNKeypointHead
from .mask_head import (
    MRCNNBaseMaskHead,
    MRCNNMaskHead,
    MRCNNMLPMaskHead,
    mask_inference,
    mask_loss,
)

__all__ = [
    "MRCNNRes5ROIHeads",
    "MRCNNStandardROIHeads",
    "MRCNNKeypointHead",
    "MRCNNBaseMaskHead",
    "MRCNNMaskHead",
    "MRCNNMLPMaskHead",
    "mask_inference",
    "mask_loss",
]
