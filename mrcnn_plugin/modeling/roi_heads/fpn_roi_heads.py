"""ROI heads with a separate pooler per branch (FPN, DC5, C5): paper Fig. 4 right.

Only the construction of the branches changes from detectron2's ``StandardROIHeads``: every
pooler is the plugin's :class:`MultiLevelRoIPooler`, whose RoI op comes from
``MODEL.MRCNN.ROI_OP`` (Table 2c) instead of ``POOLER_TYPE``. Proposal sampling, the
train/infer flow (masks on foreground proposals in training, on the final detections at test
time) and the state_dict names (``box_head.fc1``, ``box_predictor.cls_score``,
``mask_head.mask_fcn1``, ...) are detectron2's, so model-zoo checkpoints load unchanged.
"""

from typing import Dict, List

from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import (
    FastRCNNOutputLayers,
    build_box_head,
    build_keypoint_head,
    build_mask_head,
)

from ..poolers import build_pooler_from_config

__all__ = ["MRCNNStandardROIHeads"]


def _pooled_shape(cfg, head_key: str, input_shape: Dict[str, ShapeSpec], in_features: List[str]):
    """ShapeSpec (C, P, P) of the RoI features a branch's pooler produces."""
    channels = {input_shape[f].channels for f in in_features}
    # One head is shared by all pyramid levels, so they must have the same width.
    assert len(channels) == 1, f"in_features {in_features} have different channels {channels}"
    side = cfg.MODEL[head_key].POOLER_RESOLUTION
    return ShapeSpec(channels=channels.pop(), height=side, width=side)


@ROI_HEADS_REGISTRY.register()
class MRCNNStandardROIHeads(StandardROIHeads):
    """detectron2's StandardROIHeads with the plugin's poolers.

    Box branch: pooler (ROI_BOX_HEAD.POOLER_RESOLUTION, 7x7 for FPN) -> box head from
    ROI_BOX_HEAD_REGISTRY (e.g. FastRCNNConvFCHead: fc 1024, fc 1024) -> FastRCNNOutputLayers.
    Mask branch: pooler (ROI_MASK_HEAD.POOLER_RESOLUTION, 14x14) -> mask head from
    ROI_MASK_HEAD_REGISTRY (e.g. "MRCNNMaskHead" or detectron2's head).
    Keypoint branch: pooler (ROI_KEYPOINT_HEAD.POOLER_RESOLUTION) -> keypoint head from
    ROI_KEYPOINT_HEAD_REGISTRY. POOLER_TYPE of all three heads is ignored.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        box_head = build_box_head(cfg, _pooled_shape(cfg, "ROI_BOX_HEAD", input_shape, in_features))
        return {
            "box_in_features": in_features,
            "box_pooler": build_pooler_from_config(cfg, "ROI_BOX_HEAD", input_shape, in_features),
            "box_head": box_head,
            "box_predictor": FastRCNNOutputLayers(cfg, box_head.output_shape),
        }

    @classmethod
    def _init_mask_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.MASK_ON:
            return {}
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        shape = _pooled_shape(cfg, "ROI_MASK_HEAD", input_shape, in_features)
        return {
            "mask_in_features": in_features,
            "mask_pooler": build_pooler_from_config(cfg, "ROI_MASK_HEAD", input_shape, in_features),
            "mask_head": build_mask_head(cfg, shape),
        }

    @classmethod
    def _init_keypoint_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.KEYPOINT_ON:
            return {}
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        shape = _pooled_shape(cfg, "ROI_KEYPOINT_HEAD", input_shape, in_features)
        return {
            "keypoint_in_features": in_features,
            "keypoint_pooler": build_pooler_from_config(
                cfg, "ROI_KEYPOINT_HEAD", input_shape, in_features
            ),
            "keypoint_head": build_keypoint_head(cfg, shape),
        }
