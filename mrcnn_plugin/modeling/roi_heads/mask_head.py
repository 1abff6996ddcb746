"""Mask R-CNN's mask branch (paper Sec. 3, Fig. 4, Table 2b/2e) on detectron2's mask heads.

The paper's FCN head, its per-class sigmoid loss and the train/infer template are detectron2's
(MaskRCNNConvUpsampleHead, mask_rcnn_loss, BaseMaskRCNNHead). This module adds the loss choice
``MODEL.MRCNN.MASK_LOSS``, the MLP head of Table 2e and traceable inference.

Shape shorthand:
    R: number of RoIs in the batch (all images concatenated)
    K: number of mask channels: the number of foreground classes, or 1 if class-agnostic
    M: side of the predicted square mask (28 for the FPN head, 14 for the C4 head)

Loss types:
    "sigmoid": the paper's, detectron2's mask_rcnn_loss: per-pixel binary cross-entropy of the
        channel of the RoI's ground-truth class only.
    "softmax": the FCN-style multinomial loss the paper ablates against. A pixel's logits are
        ``[0, z_1, ..., z_K]``: the constant 0 is the logit of a "background" class. The target
        is the ground-truth class inside the RoI's ground-truth mask and background outside;
        the loss is the per-pixel cross-entropy averaged over all pixels of all RoIs. Because
        softmax is shift-invariant, pinning the background logit to 0 is as expressive as a free
        (K+1)-th channel, and the heads keep detectron2's K-channel predictor (same state_dict).
        With one channel (class-agnostic) it equals "sigmoid".
In both, targets are the RoI's crop of its ground-truth mask resized to M x M and only
foreground RoIs reach the head; the caller selects them.
"""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.mask_head import (
    BaseMaskRCNNHead,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MASK_LOSS_TYPES",
    "mask_loss",
    "mask_inference",
    "MRCNNBaseMaskHead",
    "MRCNNMaskHead",
    "MRCNNMLPMaskHead",
]

MASK_LOSS_TYPES = ("sigmoid", "softmax")


def _with_background_logit(logits: torch.Tensor) -> torch.Tensor:
    """(R, K, M, M) logits -> (R, K+1, M, M), channel 0 a constant-zero background logit."""
    return F.pad(logits, (0, 0, 0, 0, 1, 0), value=0.0)


def _softmax_mask_loss(pred_mask_logits: torch.Tensor, instances: List[Instances]):
    """The "softmax" loss; logs detectron2's mask_rcnn/* metrics for its predictions."""
    num_rois, num_channels, side = pred_mask_logits.shape[:3]
    channels, masks = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        gt_classes = inst.gt_classes.to(torch.int64)
        channels.append(gt_classes if num_channels > 1 else torch.zeros_like(gt_classes))
        masks.append(inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, side))
    if not masks:
        return pred_mask_logits.sum() * 0
    device = pred_mask_logits.device
    channels = torch.cat(channels).to(device)
    gt_fg = torch.cat(masks).to(device) > 0.5  # bool for detectron2's mask types; soft too
    assert gt_fg.shape[0] == num_rois, (gt_fg.shape[0], num_rois)

    logits = _with_background_logit(pred_mask_logits)
    # Target 0 is background; class channel c is target c + 1.
    loss = F.cross_entropy(logits, gt_fg.long() * (channels + 1)[:, None, None])

    pred_fg = logits.softmax(dim=1)[torch.arange(num_rois, device=device), channels + 1] > 0.5
    wrong = pred_fg != gt_fg
    num_pos = gt_fg.sum().item()
    storage = get_event_storage()
    storage.put_scalar("mask_rcnn/accuracy", 1.0 - wrong.sum().item() / max(wrong.numel(), 1))
    storage.put_scalar(
        "mask_rcnn/false_positive", (wrong & ~gt_fg).sum().item() / max(wrong.numel() - num_pos, 1)
    )
    storage.put_scalar("mask_rcnn/false_negative", (wrong & gt_fg).sum().item() / max(num_pos, 1))
    return loss


def mask_loss(
    pred_mask_logits: torch.Tensor,
    instances: List[Instances],
    loss_type: str = "sigmoid",
    vis_period: int = 0,
) -> torch.Tensor:
    """The mask loss of foreground RoIs (see the module docstring for the two loss types).

    Args:
        pred_mask_logits: (R, K, M, M) logits, in the order of the RoIs in ``instances``.
        instances: per-image foreground proposals with fields ``proposal_boxes``,
            ``gt_classes`` and ``gt_masks`` (any detectron2 mask type with crop_and_resize).
        loss_type: "sigmoid" or "softmax".
        vis_period: detectron2's mask visualization period ("sigmoid" only).

    Returns:
        A scalar tensor; ``pred_mask_logits.sum() * 0`` when there is no RoI, so the graph
        stays connected and the total loss stays finite. Needs an active EventStorage.
    """
    assert loss_type in MASK_LOSS_TYPES, loss_type
    if loss_type == "sigmoid":
        return mask_rcnn_loss(pred_mask_logits, instances, vis_period)
    return _softmax_mask_loss(pred_mask_logits, instances)


def mask_inference(
    pred_mask_logits: torch.Tensor, pred_instances: List[Instances], loss_type: str = "sigmoid"
) -> None:
    """Sets ``pred_masks`` (N_i, 1, M, M) foreground probabilities of the predicted class.

    Args:
        pred_mask_logits: (R, K, M, M) logits for the detections of all images, in order.
        pred_instances: per-image detections with ``pred_classes``; modified in place.
        loss_type: the loss the head was trained with; "sigmoid" takes the sigmoid of the
            predicted class's channel (detectron2's mask_rcnn_inference), "softmax" that class's
            softmax probability (against the other classes and the zero background logit).

    Unlike mask_rcnn_inference, which splits by ``len(instances)`` (a Python int a trace
    freezes), this splits by ``Instances.__len__()``, the box tensor's size that tracing records.
    """
    assert loss_type in MASK_LOSS_TYPES, loss_type
    num_rois, num_channels = pred_mask_logits.shape[:2]
    if num_channels == 1:
        channels = torch.zeros(num_rois, dtype=torch.int64, device=pred_mask_logits.device)
    else:
        channels = torch.cat([inst.pred_classes for inst in pred_instances])
        channels = channels.to(device=pred_mask_logits.device, dtype=torch.int64)
    rows = torch.arange(num_rois, device=pred_mask_logits.device)
    if loss_type == "sigmoid":
        probs = pred_mask_logits[rows, channels].sigmoid()
    else:
        probs = _with_background_logit(pred_mask_logits).softmax(dim=1)[rows, channels + 1]
    counts = [inst.__len__() for inst in pred_instances]
    for inst, probs_i in zip(pred_instances, probs[:, None].split(counts)):
        inst.pred_masks = probs_i


class MRCNNBaseMaskHead(BaseMaskRCNNHead):
    """detectron2's mask head template (``loss_weight``, ``vis_period``) with the loss type of
    ``MODEL.MRCNN.MASK_LOSS`` and :func:`mask_inference`; subclasses build ``layers``."""

    @configurable
    def __init__(self, *, loss_type: str = "sigmoid", **kwargs):
        """
        Args:
            loss_type: "sigmoid" or "softmax" (see the module docstring).
            kwargs: BaseMaskRCNNHead's (and its subclasses') arguments.
        """
        super().__init__(**kwargs)
        assert loss_type in MASK_LOSS_TYPES, f"unknown mask loss {loss_type!r}"
        self.loss_type = loss_type

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["loss_type"] = cfg.MODEL.MRCNN.MASK_LOSS
        return ret

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """
        Args:
            x: (R, C, P, P) RoI features.
            instances: training: the foreground proposals (with GT fields) the features were
                pooled from; inference: the detections (with ``pred_classes``).

        Returns:
            training: ``{"loss_mask": scalar}``; inference: ``instances`` with ``pred_masks``.
        """
        # float32 logits: under bfloat16 autocast the loss and the probabilities stay float32.
        logits = self.layers(x).float()
        if self.training:
            loss = mask_loss(logits, instances, self.loss_type, self.vis_period)
            return {"loss_mask": loss * self.loss_weight}
        mask_inference(logits, instances, self.loss_type)
        return instances


@ROI_MASK_HEAD_REGISTRY.register()
class MRCNNMaskHead(MRCNNBaseMaskHead, MaskRCNNConvUpsampleHead):
    """The FCN mask head of Fig. 4, detectron2's MaskRCNNConvUpsampleHead (same layers, names,
    init and checkpoints): NUM_CONV conv3x3 + ReLU, deconv 2x2/2 + ReLU, 1x1.

    FPN: NUM_CONV 4 on 14x14x256 RoIs -> 28x28xK. C4: NUM_CONV 0 on 7x7x2048 res5 features
    -> 14x14xK.
    """


@ROI_MASK_HEAD_REGISTRY.register()
class MRCNNMLPMaskHead(MRCNNBaseMaskHead, nn.Sequential):
    """The MLP mask head of Table 2e: flattened RoI features -> fc layers -> K x M x M.

    With P x P input the mask side is M = 2P (28 for 14x14 RoIs), the FCN head's output size.
    Parameters: ``mask_fc{i}``, ``predictor``.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: ShapeSpec,
        num_classes: int,
        fc_dims: List[int],
        mask_side: int,
        **kwargs,
    ):
        """
        Args:
            input_shape: (C, P, P) of the RoI features.
            num_classes: K, the number of output masks (1 for class-agnostic).
            fc_dims: widths of the hidden fc layers (each followed by ReLU).
            mask_side: M, the side of the predicted masks.
            kwargs: MRCNNBaseMaskHead's arguments.
        """
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.mask_side = mask_side
        self.add_module("flatten", nn.Flatten())
        dim = input_shape.channels * input_shape.height * input_shape.width
        for i, fc_dim in enumerate(fc_dims, 1):
            fc = nn.Linear(dim, fc_dim)
            weight_init.c2_xavier_fill(fc)
            self.add_module(f"mask_fc{i}", fc)
            self.add_module(f"mask_fc_relu{i}", nn.ReLU())
            dim = fc_dim
        self.predictor = nn.Linear(dim, num_classes * mask_side * mask_side)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        agnostic = cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
        ret.update(
            input_shape=input_shape,
            num_classes=1 if agnostic else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            fc_dims=list(cfg.MODEL.MRCNN.MASK_MLP_DIMS),
            mask_side=2 * input_shape.height,
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) features -> (R, K, M, M) mask logits."""
        for layer in self:
            x = layer(x)
        return x.view(-1, self.num_classes, self.mask_side, self.mask_side)
