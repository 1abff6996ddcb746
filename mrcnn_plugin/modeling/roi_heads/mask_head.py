"""Mask R-CNN's mask branch (paper Sec. 3, Fig. 4, Table 2b/2e): loss, inference and heads.

Shape shorthand:
    R: number of RoIs in the batch (all images concatenated)
    K: number of mask channels: the number of foreground classes, or 1 if class-agnostic
    M: side of the predicted square mask (28 for the FPN head, 14 for the C4 head)
    C, P: channels and side of the pooled RoI features a head takes

Loss types (``MODEL.MRCNN.MASK_LOSS``):
    "sigmoid": the paper's. Each channel is an independent binary mask; the loss is the mean
        per-pixel binary cross-entropy of the channel of the RoI's ground-truth class only.
    "softmax": the FCN-style multinomial loss the paper ablates against. A pixel's logits are
        ``[0, z_1, ..., z_K]``: the constant 0 is the logit of a "background" class. The target
        is the ground-truth class inside the RoI's ground-truth mask and background outside;
        the loss is the per-pixel cross-entropy averaged over all pixels of all RoIs. Because
        softmax is shift-invariant, pinning the background logit to 0 is as expressive as a free
        (K+1)-th channel, and the heads keep detectron2's K-channel predictor (same state_dict).
        With one channel (class-agnostic) it equals "sigmoid".
In both, targets are the RoI's crop of its ground-truth mask resized to M x M (the intersection
of the RoI with the mask) and only foreground RoIs reach the head; the caller selects them.
"""

from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec, get_norm
from detectron2.modeling import ROI_MASK_HEAD_REGISTRY
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


def _mask_targets(instances: List[Instances], num_channels: int, side: int, device):
    """The channel each RoI is trained on and its mask target.

    Returns:
        Tensor (R,) int64: the GT class (0 for all RoIs when class-agnostic).
        Tensor (R, M, M) bool: the GT mask cropped to the proposal box and resized to M x M.
    """
    channels, masks = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        if num_channels > 1:
            channels.append(inst.gt_classes.to(device=device, dtype=torch.int64))
        else:
            channels.append(torch.zeros(len(inst), dtype=torch.int64, device=device))
        crop = inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, side).to(device=device)
        # crop_and_resize returns bool for detectron2's mask types; accept soft masks too.
        masks.append(crop if crop.dtype == torch.bool else crop > 0.5)
    if not masks:
        empty = torch.zeros(0, side, side, dtype=torch.bool, device=device)
        return torch.zeros(0, dtype=torch.int64, device=device), empty
    return torch.cat(channels), torch.cat(masks)


def _log_mask_metrics(pred_fg: torch.Tensor, gt_fg: torch.Tensor) -> None:
    """Logs detectron2's mask_rcnn/{accuracy,false_positive,false_negative} if a storage exists.

    pred_fg, gt_fg: bool tensors of shape (R, M, M).
    """
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage active (e.g. a bare forward in a test)
        return
    wrong = pred_fg != gt_fg
    num_pos = gt_fg.sum().item()
    num_neg = gt_fg.numel() - num_pos
    storage.put_scalar("mask_rcnn/accuracy", 1.0 - wrong.sum().item() / max(wrong.numel(), 1))
    storage.put_scalar("mask_rcnn/false_positive", (wrong & ~gt_fg).sum().item() / max(num_neg, 1))
    storage.put_scalar("mask_rcnn/false_negative", (wrong & gt_fg).sum().item() / max(num_pos, 1))


def mask_loss(
    pred_mask_logits: torch.Tensor, instances: List[Instances], loss_type: str = "sigmoid"
) -> torch.Tensor:
    """The mask loss of foreground RoIs (see the module docstring for the two loss types).

    Args:
        pred_mask_logits: (R, K, M, M) logits, in the order of the RoIs in ``instances``.
        instances: per-image foreground proposals with fields ``proposal_boxes``,
            ``gt_classes`` and ``gt_masks`` (any detectron2 mask type with crop_and_resize).
        loss_type: "sigmoid" or "softmax".

    Returns:
        A scalar tensor; ``pred_mask_logits.sum() * 0`` when there is no RoI, so the graph
        stays connected and the total loss stays finite.
    """
    num_rois, num_channels, side, side_w = pred_mask_logits.shape
    assert side == side_w, "mask predictions must be square"
    assert loss_type in MASK_LOSS_TYPES, loss_type
    gt_channels, gt_masks = _mask_targets(instances, num_channels, side, pred_mask_logits.device)
    assert gt_masks.shape[0] == num_rois, (gt_masks.shape[0], num_rois)
    if num_rois == 0:
        return pred_mask_logits.sum() * 0

    rows = torch.arange(num_rois, device=pred_mask_logits.device)
    if loss_type == "sigmoid":
        logits = pred_mask_logits[rows, gt_channels]  # (R, M, M)
        loss = F.binary_cross_entropy_with_logits(logits, gt_masks.to(logits.dtype))
        pred_fg = logits > 0
    else:
        logits = _with_background_logit(pred_mask_logits)  # (R, K+1, M, M)
        # Target 0 is background; class channel c is target c + 1.
        target = gt_masks.long() * (gt_channels + 1)[:, None, None]
        loss = F.cross_entropy(logits, target)
        pred_fg = logits.softmax(dim=1)[rows, gt_channels + 1] > 0.5
    _log_mask_metrics(pred_fg, gt_masks)
    return loss


def mask_inference(
    pred_mask_logits: torch.Tensor, pred_instances: List[Instances], loss_type: str = "sigmoid"
) -> None:
    """Sets ``pred_masks`` (N_i, 1, M, M) foreground probabilities of the predicted class.

    Args:
        pred_mask_logits: (R, K, M, M) logits for the detections of all images, in order.
        pred_instances: per-image detections with ``pred_classes``; modified in place.
        loss_type: the loss the head was trained with; "sigmoid" takes the sigmoid of the
            predicted class's channel, "softmax" that class's softmax probability (against the
            other classes and the zero background logit).
    The soft masks are pasted into the image and binarized at 0.5 by detectron2's
    ``detector_postprocess``.
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
    probs = probs[:, None]  # (R, 1, M, M)
    # Instances.__len__() is the box tensor's traced size; len() would freeze it under tracing.
    counts = [inst.__len__() for inst in pred_instances]
    for inst, probs_i in zip(pred_instances, probs.split(counts)):
        inst.pred_masks = probs_i


class MRCNNBaseMaskHead(nn.Module):
    """Train/infer template of a mask head; subclasses build the layers in ``layers``."""

    @configurable
    def __init__(self, *, loss_type: str = "sigmoid", loss_weight: float = 1.0):
        """
        Args:
            loss_type: "sigmoid" or "softmax" (see the module docstring).
            loss_weight: multiplier of ``loss_mask``.
        """
        super().__init__()
        assert loss_type in MASK_LOSS_TYPES, f"unknown mask loss {loss_type!r}"
        self.loss_type = loss_type
        self.loss_weight = loss_weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {"loss_type": cfg.MODEL.MRCNN.MASK_LOSS}

    @staticmethod
    def _num_mask_channels(cfg) -> int:
        return 1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """
        Args:
            x: (R, C, P, P) RoI features.
            instances: training: the foreground proposals (with GT fields) the features were
                pooled from; inference: the detections (with ``pred_classes``).

        Returns:
            training: ``{"loss_mask": scalar}``; inference: ``instances`` with ``pred_masks``.
        """
        logits = self.layers(x)
        if self.training:
            return {"loss_mask": mask_loss(logits, instances, self.loss_type) * self.loss_weight}
        mask_inference(logits, instances, self.loss_type)
        return instances

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) features -> (R, K, M, M) mask logits."""
        raise NotImplementedError


@ROI_MASK_HEAD_REGISTRY.register()
class MRCNNMaskHead(MRCNNBaseMaskHead):
    """The FCN mask head of Fig. 4: ``num_conv`` conv3x3 + ReLU, deconv 2x2/2 + ReLU, 1x1.

    FPN: num_conv=4 on 14x14x256 RoIs -> 28x28xK. C4: num_conv=0 on 7x7x2048 res5 features
    -> 14x14xK. Parameter names equal detectron2's MaskRCNNConvUpsampleHead
    (``mask_fcn{i}``, ``deconv``, ``predictor``), so its checkpoints load as is.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: ShapeSpec,
        num_classes: int,
        num_conv: int,
        conv_dim: int,
        norm: str = "",
        **kwargs,
    ):
        """
        Args:
            input_shape: channels of the RoI features.
            num_classes: K, the number of output masks (1 for class-agnostic).
            num_conv: number of conv3x3 layers before the deconv.
            conv_dim: channels of the convs and of the deconv output.
            norm: normalization of the convs (see detectron2.layers.get_norm); "" for none.
            kwargs: MRCNNBaseMaskHead's arguments.
        """
        super().__init__(**kwargs)
        channels = input_shape.channels
        self.convs = []
        for i in range(num_conv):
            conv = Conv2d(
                channels,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, conv_dim),
                activation=nn.ReLU(),
            )
            self.add_module(f"mask_fcn{i + 1}", conv)
            self.convs.append(conv)
            channels = conv_dim
        self.deconv = ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = Conv2d(conv_dim, num_classes, kernel_size=1)

        # detectron2's initialization, so training behaves the same.
        for layer in self.convs + [self.deconv]:
            weight_init.c2_msra_fill(layer)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_MASK_HEAD
        ret.update(
            input_shape=input_shape,
            num_classes=cls._num_mask_channels(cfg),
            num_conv=head.NUM_CONV,
            conv_dim=head.CONV_DIM,
            norm=head.NORM,
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.predictor(F.relu(self.deconv(x)))


@ROI_MASK_HEAD_REGISTRY.register()
class MRCNNMLPMaskHead(MRCNNBaseMaskHead):
    """The MLP mask head of Table 2e: flattened RoI features -> fc layers -> K x M x M.

    With P x P input the mask side is M = 2P (28 for 14x14 RoIs), the FCN head's output size.
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
        dim = input_shape.channels * input_shape.height * input_shape.width
        self.fcs = []
        for i, fc_dim in enumerate(fc_dims):
            fc = nn.Linear(dim, fc_dim)
            weight_init.c2_xavier_fill(fc)
            self.add_module(f"mask_fc{i + 1}", fc)
            self.fcs.append(fc)
            dim = fc_dim
        self.predictor = nn.Linear(dim, num_classes * mask_side * mask_side)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            input_shape=input_shape,
            num_classes=cls._num_mask_channels(cfg),
            fc_dims=list(cfg.MODEL.MRCNN.MASK_MLP_DIMS),
            mask_side=2 * input_shape.height,
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        side = self.mask_side
        return self.predictor(x).view(-1, self.num_classes, side, side)
