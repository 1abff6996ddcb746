"""Keypoint R-CNN's keypoint branch (paper Sec. 5): loss, inference and the conv/deconv head.

Shape shorthand:
    R: number of RoIs in the batch (all images concatenated)
    K: number of keypoints (17 for COCO persons)
    C, P: channels and side of the pooled RoI features (256 x 14 x 14 for FPN)
    S: side of the predicted heatmaps (4P: 56 for 14x14 RoIs)

Each keypoint is a one-hot S x S target: the heatmap cell its ground-truth location falls into,
inside the RoI. The loss is the cross-entropy of an S^2-way softmax per visible keypoint, the K
keypoints of a RoI being independent. At test time the peak of each heatmap, located on the
heatmap resized to the detection's box, is the predicted keypoint.

Horizontal flips need no handling here: detectron2's data mapper swaps left/right keypoints when
it flips an image (``keypoint_hflip_indices`` built from the ``keypoint_flip_map`` metadata).
"""

import math
from typing import List, Optional, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec
from detectron2.modeling import ROI_KEYPOINT_HEAD_REGISTRY
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

__all__ = [
    "keypoint_loss",
    "decode_heatmaps",
    "keypoint_inference",
    "MRCNNBaseKeypointHead",
    "MRCNNKeypointHead",
]

_num_skipped_batches = 0  # training batches without any visible keypoint, logged like detectron2


def _log_skipped_batch() -> None:
    global _num_skipped_batches
    _num_skipped_batches += 1
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage active (e.g. a bare forward in a test)
        return
    storage.put_scalar("kpts_num_skipped_batches", _num_skipped_batches, smoothing_hint=False)


def keypoint_loss(
    pred_keypoint_logits: torch.Tensor,
    instances: List[Instances],
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """Sum of the S^2-way softmax cross-entropies of the visible keypoints, over ``normalizer``.

    Args:
        pred_keypoint_logits: (R, K, S, S) spatial logits, in the order of the RoIs in
            ``instances``.
        instances: per-image proposals with fields ``proposal_boxes`` and ``gt_keypoints``
            (``Keypoints`` of shape (N_i, K, 3)).
        normalizer: divide the summed loss by this; None: by the number of visible keypoints.

    A keypoint counts if its visibility flag is > 0 and it falls inside its proposal box (the
    ``valid`` of ``Keypoints.to_heatmap``). Returns a scalar; ``pred_keypoint_logits.sum() * 0``
    when no keypoint counts, so the graph stays connected and the total loss finite.
    """
    num_rois, num_keypoints, side, side_w = pred_keypoint_logits.shape
    assert side == side_w, "keypoint heatmaps must be square"
    targets, valid = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        # Flat cell index y * S + x of each keypoint (N_i, K) and whether it is usable.
        cell, ok = inst.gt_keypoints.to_heatmap(inst.proposal_boxes.tensor, side)
        targets.append(cell.reshape(-1))
        valid.append(ok.reshape(-1) > 0)
    device = pred_keypoint_logits.device
    valid = torch.cat(valid).to(device) if valid else torch.zeros(0, dtype=torch.bool)
    if not valid.any():
        _log_skipped_batch()
        return pred_keypoint_logits.sum() * 0
    targets = torch.cat(targets).to(device)
    assert valid.numel() == num_rois * num_keypoints, (valid.numel(), num_rois, num_keypoints)

    # One row of S*S logits per (RoI, keypoint); float32 so bfloat16 autocast stays accurate.
    logits = pred_keypoint_logits.reshape(num_rois * num_keypoints, side * side)[valid].float()
    loss = F.cross_entropy(logits, targets[valid], reduction="sum")
    if normalizer is None:
        normalizer = valid.sum().item()
    return loss / normalizer


def decode_heatmaps(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Heatmap logits -> keypoints (x, y, score) in image coordinates.

    Args:
        maps: (R, K, S, S) logits of R detections.
        boxes: (R, 4) their boxes (x0, y0, x1, y1).

    Returns:
        (R, K, 3) float32. For each box of size w x h (each clamped to >= 1), the maps are
        resized bicubically to ceil(h) x ceil(w) cells and the peak cell (i, j) is taken.
        Cell centres are mapped back with Heckbert's c = d + 0.5, scaled by w / ceil(w) so the
        ceil-sized grid covers exactly the box: x = x0 + (j + 0.5) * w / ceil(w). The score is
        the peak's probability in a softmax over the S x S low-resolution cells,
        exp(peak - logsumexp(map)), which keeps scores of small and large boxes comparable.
        This is the decoding of detectron2's ``heatmaps_to_keypoints`` (x, y and its
        normalized score), so the outputs equal detectron2's built-in head.
    """
    maps = maps.detach().float()
    boxes = boxes.detach().float()
    num_rois, num_keypoints = maps.shape[:2]
    out = maps.new_zeros((num_rois, num_keypoints, 3))
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    # Log-normalizer of each keypoint's low-resolution softmax, (R, K).
    log_norm = torch.logsumexp(maps.flatten(2), dim=2)
    for i in range(num_rois):
        w, h = widths[i], heights[i]
        out_w, out_h = math.ceil(w.item()), math.ceil(h.item())
        resized = F.interpolate(
            maps[i : i + 1], size=(out_h, out_w), mode="bicubic", align_corners=False
        )[0]
        flat = resized.reshape(num_keypoints, -1)
        peak_index = flat.argmax(dim=1)
        peak = flat.gather(1, peak_index[:, None])[:, 0]
        col = peak_index % out_w
        row = torch.div(peak_index, out_w, rounding_mode="floor")
        out[i, :, 0] = boxes[i, 0] + (col.float() + 0.5) * (w / out_w)
        out[i, :, 1] = boxes[i, 1] + (row.float() + 0.5) * (h / out_h)
        out[i, :, 2] = torch.exp(peak - log_norm[i])
    return out


def keypoint_inference(pred_keypoint_logits: torch.Tensor, pred_instances: List[Instances]):
    """Sets ``pred_keypoints`` (N_i, K, 3) and ``pred_keypoint_heatmaps`` (N_i, K, S, S).

    Args:
        pred_keypoint_logits: (R, K, S, S) logits for the detections of all images, in order.
        pred_instances: per-image detections with ``pred_boxes``; modified in place.

    ``pred_keypoints`` holds (x, y, score) in the coordinates of the boxes (the network's input
    image; detectron2's ``detector_postprocess`` rescales them to the original image). See
    :func:`decode_heatmaps`. ``pred_keypoint_heatmaps`` are the raw logits.
    """
    logits = pred_keypoint_logits.detach()
    # Instances.__len__() is the box tensor's traced size; len() would freeze it under tracing.
    counts = [inst.__len__() for inst in pred_instances]
    if torch.jit.is_tracing():
        # Decoding loops over detections with data-dependent sizes: a traced model returns
        # the heatmaps and mrcnn_plugin.export.postprocess decodes them eagerly.
        for inst, maps in zip(pred_instances, logits.split(counts)):
            inst.pred_keypoint_heatmaps = maps
        return
    boxes = torch.cat([inst.pred_boxes.tensor for inst in pred_instances], dim=0)
    keypoints = decode_heatmaps(logits, boxes)
    for inst, kpts, maps in zip(pred_instances, keypoints.split(counts), logits.split(counts)):
        inst.pred_keypoints = kpts
        inst.pred_keypoint_heatmaps = maps


class MRCNNBaseKeypointHead(nn.Module):
    """Train/infer template of a keypoint head; subclasses build the layers in ``layers``."""

    @configurable
    def __init__(
        self,
        *,
        num_keypoints: int,
        loss_weight: float = 1.0,
        loss_normalizer: Union[str, float] = "visible",
    ):
        """
        Args:
            num_keypoints: K.
            loss_weight: multiplier of ``loss_keypoint``.
            loss_normalizer: "visible": divide the loss by the number of visible keypoints in
                the batch; a float n: divide it by n * number of images.
        """
        super().__init__()
        if not (loss_normalizer == "visible" or isinstance(loss_normalizer, float)):
            raise ValueError(f"loss_normalizer must be 'visible' or a float: {loss_normalizer!r}")
        self.num_keypoints = num_keypoints
        self.loss_weight = loss_weight
        self.loss_normalizer = loss_normalizer

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_KEYPOINT_HEAD
        if head.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS:
            normalizer = "visible"
        else:
            # The expected number of keypoints per image: K per positive RoI.
            rois = cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION
            normalizer = float(head.NUM_KEYPOINTS * rois)
        return {
            "num_keypoints": head.NUM_KEYPOINTS,
            "loss_weight": head.LOSS_WEIGHT,
            "loss_normalizer": normalizer,
        }

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """
        Args:
            x: (R, C, P, P) RoI features.
            instances: training: the proposals with visible keypoints (with ``proposal_boxes``
                and ``gt_keypoints``) the features were pooled from; inference: the detections
                (with ``pred_boxes``).

        Returns:
            training: ``{"loss_keypoint": scalar}``; inference: ``instances`` with
            ``pred_keypoints`` and ``pred_keypoint_heatmaps``.
        """
        logits = self.layers(x)
        if self.training:
            normalizer = None
            if self.loss_normalizer != "visible":
                normalizer = len(instances) * self.loss_normalizer
            loss = keypoint_loss(logits, instances, normalizer) * self.loss_weight
            return {"loss_keypoint": loss}
        keypoint_inference(logits, instances)
        return instances

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) features -> (R, K, S, S) heatmap logits."""
        raise NotImplementedError


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class MRCNNKeypointHead(MRCNNBaseKeypointHead):
    """The head of Sec. 5: conv3x3 + ReLU layers, deconv 4x4/2, then 2x bilinear upsampling.

    With the paper's 8 convs of 512 channels on 14x14 RoIs it outputs 56x56 heatmaps. Parameter
    names (``conv_fcn{i}``, ``score_lowres``) and initialization equal detectron2's
    KRCNNConvDeconvUpsampleHead, so its checkpoints load as is.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: ShapeSpec,
        num_keypoints: int,
        conv_dims: Sequence[int],
        up_scale: float = 2.0,
        **kwargs,
    ):
        """
        Args:
            input_shape: channels of the RoI features.
            num_keypoints: K, the number of heatmaps.
            conv_dims: output channels of each conv3x3 layer, e.g. (512,) * 8.
            up_scale: factor of the final bilinear upsampling.
            kwargs: MRCNNBaseKeypointHead's arguments.
        """
        super().__init__(num_keypoints=num_keypoints, **kwargs)
        self.up_scale = up_scale
        channels = input_shape.channels
        self.convs = []
        for i, dim in enumerate(conv_dims):
            conv = Conv2d(channels, dim, kernel_size=3, padding=1)
            self.add_module(f"conv_fcn{i + 1}", conv)
            self.convs.append(conv)
            channels = dim
        # kernel 4, stride 2, padding 1 exactly doubles the side.
        self.score_lowres = ConvTranspose2d(channels, num_keypoints, 4, stride=2, padding=1)

        # detectron2's (Caffe2 MSRAFill) initialization, so training behaves the same.
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(input_shape=input_shape, conv_dims=tuple(cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS))
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.score_lowres(x)
        return F.interpolate(x, scale_factor=self.up_scale, mode="bilinear", align_corners=False)
