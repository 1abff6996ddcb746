"""The plugin's config keys. ``add_mrcnn_config`` is the only place they are defined.

Usage::

    cfg = get_cfg()
    add_mrcnn_config(cfg)
    cfg.merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")

Everything else (backbone depth, pooler resolution, sampling ratio, ...) uses detectron2's own
keys, so a plugin config reads like a detectron2 one. detectron2's global defaults are never
touched: the keys are added to the ``cfg`` passed in only.
"""

from typing import List, Optional

from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN

from .data.train_loader import add_data_validation_config


def add_mrcnn_config(cfg):
    """Adds the ``MODEL.MRCNN`` node to ``cfg`` in place and returns it."""
    mrcnn = cfg.MODEL.MRCNN = CN()

    # RoI feature extraction (paper Table 2c/2d) of every branch whose POOLER_TYPE is set
    # (POOLER_TYPE "" means no pooler, as in detectron2; any other value is replaced by this op).
    # NAME is looked up in ROI_OP_REGISTRY: "MRCNNRoIAlign", "MRCNNRoIPool" or "MRCNNRoIWarp".
    # Resolution and sampling ratio come from each head's POOLER_RESOLUTION /
    # POOLER_SAMPLING_RATIO, as in detectron2.
    mrcnn.ROI_OP = CN()
    mrcnn.ROI_OP.NAME = "MRCNNRoIAlign"
    # Half-pixel shift of RoI coordinates (detectron2's ROIAlignV2). The paper's RoIAlign
    # is not aligned; detectron2's default is. RoIPool and RoIWarp need False.
    mrcnn.ROI_OP.ALIGNED = True
    # How the samples in a bin are combined: "avg" or "max" (RoIAlign and RoIWarp; RoIPool
    # needs "max").
    mrcnn.ROI_OP.AGGREGATION = "avg"
    # FPN level assignment (FPN paper eq. 1): k = floor(k0 + log2(sqrt(wh) / 224)).
    mrcnn.ROI_OP.CANONICAL_BOX_SIZE = 224
    mrcnn.ROI_OP.CANONICAL_LEVEL = 4
    # Per-branch overrides of NAME / ALIGNED / AGGREGATION: a key left at None takes the value
    # above, e.g. ROI_OP.KEYPOINT.NAME "MRCNNRoIPool" (with ALIGNED False, AGGREGATION "max")
    # changes only the keypoint branch (mrcnn_plugin.modeling.poolers.roi_op_of_head resolves
    # them). The C4 head pools once for all branches, so it takes only the BOX overrides.
    for branch in ("BOX", "MASK", "KEYPOINT"):
        mrcnn.ROI_OP[branch] = CN({"NAME": None, "ALIGNED": None, "AGGREGATION": None})

    # C4 head: stride of res5's first block. 2 is detectron2's design (14x14 RoIs into a
    # stride-2 res5); 1 is the paper's Fig. 4 (7x7 RoIs, res5 run at stride 1).
    mrcnn.RES5_FIRST_STRIDE = 2

    # Mask loss (Table 2b): "sigmoid" (per-class binary cross-entropy, the paper's) or
    # "softmax" (multinomial over classes per pixel).
    mrcnn.MASK_LOSS = "sigmoid"
    # Hidden fc widths of the MLP mask head (Table 2e), used by "MRCNNMLPMaskHead".
    mrcnn.MASK_MLP_DIMS = [1024, 1024]
    # Training data the project did not make: bad images/annotations (DATALOADER.MRCNN).
    add_data_validation_config(cfg)
    return cfg


def build_cfg(config_file: str, opts: Optional[List[str]] = None) -> CfgNode:
    """get_cfg() + the plugin's keys + ``config_file`` + ``opts`` (KEY VALUE ...); unfrozen."""
    cfg = get_cfg()
    add_mrcnn_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    return cfg
