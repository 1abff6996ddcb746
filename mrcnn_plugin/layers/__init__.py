"""The plugin's own layers: RoI feature extraction ops and their registry."""

from .registry import ROI_OP_REGISTRY, MRCNNRoIAlign, MRCNNRoIPool, MRCNNRoIWarp
from .roi_ops import RoIAlign, RoIPool, RoIWarp, quantize_rois, roi_align, roi_pool, roi_warp

__all__ = [
    "ROI_OP_REGISTRY",
    "MRCNNRoIAlign",
    "MRCNNRoIPool",
    "MRCNNRoIWarp",
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
    "quantize_rois",
    "roi_align",
    "roi_pool",
    "roi_warp",
]
