"""ROI heads of the ResNet-C4 Mask R-CNN (paper Fig. 4 left): one res5 shared by all branches.

RoI features pooled from res4 -> res5 (R, 2048, S, S) -> average pool -> FastRCNNOutputLayers.
The mask branch (and the keypoint branch, if on) runs on the same res5 features: in training
those of the foreground proposals, at test time those of the final detections.

S is POOLER_RESOLUTION / MODEL.MRCNN.RES5_FIRST_STRIDE: detectron2's 14x14 RoIs into a stride-2
res5, or the paper's 7x7 RoIs into a stride-1 res5; both give 7x7 and a 14x14 mask.
Built on detectron2's public ``ROIHeads`` (proposal matching and sampling); the attribute
names equal detectron2's Res5ROIHeads' (``pooler``, ``res5.{0,1,2}``, ``box_predictor``,
``mask_head``), so its checkpoints load unchanged.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import (
    FastRCNNOutputLayers,
    ROIHeads,
    build_keypoint_head,
    build_mask_head,
    select_foreground_proposals,
)
from detectron2.modeling.roi_heads.roi_heads import select_proposals_with_visible_keypoints
from detectron2.structures import ImageList, Instances
from torch import nn

from ..backbone import make_res5_stage, res5_stage_kwargs_from_config
from ..poolers import build_pooler_from_config

__all__ = ["MRCNNRes5ROIHeads"]

# A temporary per-proposal field: the row of its res5 features, kept through the fg/keypoint
# selections (which return Instances, not indices).
_FEATURE_ROW = "mrcnn_feature_row"


@ROI_HEADS_REGISTRY.register()
class MRCNNRes5ROIHeads(ROIHeads):
    """A C4 head (as detectron2's Res5ROIHeads) with the plugin's pooler and res5, plus a
    keypoint branch.

    Config: ROI_HEADS.IN_FEATURES (one map, "res4"), ROI_BOX_HEAD.POOLER_RESOLUTION /
    POOLER_SAMPLING_RATIO, MODEL.MRCNN.ROI_OP (with its BOX overrides),
    MODEL.MRCNN.RES5_FIRST_STRIDE, MODEL.RESNETS (res5 width, norm, ResNeXt groups),
    MASK_ON / ROI_MASK_HEAD.*, KEYPOINT_ON / ROI_KEYPOINT_HEAD.* (their POOLER_* keys are
    unused: the RoI features are shared).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        pooler: nn.Module,
        res5: nn.Module,
        box_predictor: nn.Module,
        mask_head: Optional[nn.Module] = None,
        keypoint_head: Optional[nn.Module] = None,
        **kwargs,
    ):
        """
        Args:
            in_features: the one feature map to pool from, e.g. ["res4"].
            pooler: ``pooler([feature], boxes) -> (R, C, P, P)``.
            res5: (R, C, P, P) -> (R, C', S, S), shared by all branches.
            box_predictor: FastRCNNOutputLayers on the (R, C') average-pooled res5 features.
            mask_head, keypoint_head: run on the res5 features (R, C', S, S) of the foreground
                proposals (training; for keypoints those with visible keypoints) or of the
                detections (inference); None: no such branch.
            kwargs: ROIHeads' arguments (num_classes, proposal_matcher, ...).
        """
        super().__init__(**kwargs)
        self.in_features = in_features
        self.pooler = pooler
        self.res5 = res5
        self.box_predictor = box_predictor
        self.mask_on = mask_head is not None
        if self.mask_on:
            self.mask_head = mask_head
        self.keypoint_on = keypoint_head is not None
        if self.keypoint_on:
            self.keypoint_head = keypoint_head

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg)
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        assert len(in_features) == 1, f"C4 heads pool from one feature map, got {in_features}"
        for branch in ("MASK", "KEYPOINT"):
            overrides = cfg.MODEL.MRCNN.ROI_OP[branch]
            if any(v is not None for v in overrides.values()):
                raise ValueError(
                    f"MODEL.MRCNN.ROI_OP.{branch} is set, but the C4 head pools once for all "
                    "branches: set MODEL.MRCNN.ROI_OP (or its BOX overrides) instead"
                )
        assert not cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE[-1], "no deformable res5 in the head"
        res5_kwargs = res5_stage_kwargs_from_config(cfg)
        channels, stride = res5_kwargs["out_channels"], res5_kwargs["first_stride"]
        side = -(-cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION // stride)  # res5 output, ceil
        res5_shape = ShapeSpec(channels=channels, height=side, width=side)
        ret.update(
            in_features=in_features,
            pooler=build_pooler_from_config(cfg, "ROI_BOX_HEAD", input_shape, in_features),
            res5=make_res5_stage(**res5_kwargs),
            box_predictor=FastRCNNOutputLayers(cfg, ShapeSpec(channels=channels)),
        )
        if cfg.MODEL.MASK_ON:
            ret["mask_head"] = build_mask_head(cfg, res5_shape)
        if cfg.MODEL.KEYPOINT_ON:
            ret["keypoint_head"] = build_keypoint_head(cfg, res5_shape)
        return ret

    def _res5_features(self, features: Dict[str, torch.Tensor], boxes) -> torch.Tensor:
        """(R, C', S, S) res5 features of ``boxes`` (N lists of Boxes)."""
        return self.res5(self.pooler([features[f] for f in self.in_features], boxes))

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """See detectron2's ``ROIHeads.forward``: (detections, {}) or ([], losses)."""
        del images
        if self.training:
            assert targets, "'targets' are required in training"
            proposals = self.label_and_sample_proposals(proposals, targets)
        del targets

        res5_features = self._res5_features(features, [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(res5_features.mean(dim=[2, 3]))
        if not self.training:
            detections, _ = self.box_predictor.inference(predictions, proposals)
            return self.forward_with_given_boxes(features, detections), {}

        losses = self.box_predictor.losses(predictions, proposals)
        if self.mask_on or self.keypoint_on:
            losses.update(self._forward_foreground(res5_features, proposals))
        return [], losses

    def _forward_foreground(
        self, res5_features: torch.Tensor, proposals: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """Mask/keypoint losses on the already computed res5 features of the fg proposals."""
        start = 0
        for p in proposals:
            p.set(_FEATURE_ROW, torch.arange(start, start + len(p), device=res5_features.device))
            start += len(p)
        fg_proposals, _ = select_foreground_proposals(proposals, self.num_classes)
        losses = {}
        if self.mask_on:
            rows = torch.cat([p.get(_FEATURE_ROW) for p in fg_proposals])
            losses.update(self.mask_head(res5_features[rows], fg_proposals))
        if self.keypoint_on:
            kpt_proposals = select_proposals_with_visible_keypoints(fg_proposals)
            rows = torch.cat([p.get(_FEATURE_ROW) for p in kpt_proposals])
            losses.update(self.keypoint_head(res5_features[rows], kpt_proposals))
        for p in proposals:
            p.remove(_FEATURE_ROW)
        return losses

    def forward_with_given_boxes(
        self, features: Dict[str, torch.Tensor], instances: List[Instances]
    ) -> List[Instances]:
        """Adds ``pred_masks`` / ``pred_keypoints`` to detections (fields pred_boxes,
        pred_classes), from the res5 features of the detected boxes."""
        assert not self.training
        assert instances[0].has("pred_boxes") and instances[0].has("pred_classes")
        if not (self.mask_on or self.keypoint_on):
            return instances
        x = self._res5_features(features, [i.pred_boxes for i in instances])
        if self.mask_on:
            instances = self.mask_head(x, instances)
        if self.keypoint_on:
            instances = self.keypoint_head(x, instances)
        return instances
