"""Keypoint R-CNN's keypoint branch (paper Sec. 5) on detectron2's keypoint head.

detectron2's KRCNNConvDeconvUpsampleHead is the paper's head: conv3x3 + ReLU layers (8 of 512
channels), deconv 4x4/2 and 2x bilinear upsampling, 14x14 RoIs -> 56x56 heatmaps. Its loss
(``keypoint_rcnn_loss``: an S^2-way softmax cross-entropy per visible keypoint) and decoding
(``heatmaps_to_keypoints``: the peak of each heatmap resized to its box) are the paper's too.
The plugin's head adds float32 heatmaps under autocast and inference that traces with a
dynamic number of detections. On the C4 model it runs on the pooled res5 features.

Horizontal flips need no handling here: detectron2's data mapper swaps left/right keypoints when
it flips an image (``keypoint_hflip_indices`` built from the ``keypoint_flip_map`` metadata).
"""

from typing import List

import torch
from detectron2.modeling import ROI_KEYPOINT_HEAD_REGISTRY
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.structures import Instances, heatmaps_to_keypoints

__all__ = ["keypoint_inference", "MRCNNKeypointHead"]


def keypoint_inference(pred_keypoint_logits: torch.Tensor, pred_instances: List[Instances]):
    """Sets ``pred_keypoints`` (N_i, K, 3) and ``pred_keypoint_heatmaps`` (N_i, K, S, S).

    Args:
        pred_keypoint_logits: (R, K, S, S) logits for the detections of all images, in order.
        pred_instances: per-image detections with ``pred_boxes``; modified in place.

    detectron2's ``keypoint_rcnn_inference``: (x, y, score) from ``heatmaps_to_keypoints`` (which
    detectron2 scripts when tracing) in the boxes' coordinates, and the raw logits. It splits by
    ``Instances.__len__()``, the box tensor's size that tracing records, where detectron2's
    ``len()`` gives a Python int that a trace freezes.
    """
    logits = pred_keypoint_logits.detach()
    boxes = torch.cat([inst.pred_boxes.tensor for inst in pred_instances]).detach()
    keypoints = heatmaps_to_keypoints(logits, boxes)[:, :, [0, 1, 3]]  # drop the raw logit
    counts = [inst.__len__() for inst in pred_instances]
    for inst, kpts, maps in zip(pred_instances, keypoints.split(counts), logits.split(counts)):
        inst.pred_keypoints = kpts
        inst.pred_keypoint_heatmaps = maps


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class MRCNNKeypointHead(KRCNNConvDeconvUpsampleHead):
    """detectron2's KRCNNConvDeconvUpsampleHead (same layers, names ``conv_fcn{i}`` and
    ``score_lowres``, init and checkpoints, same ``keypoint_rcnn_loss``) with float32 heatmaps
    and :func:`keypoint_inference`."""

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) features -> (R, K, 4P, 4P) heatmap logits, float32 also under bfloat16
        autocast so the S^2-way softmax of the loss and of the scores stays accurate.
        Contiguous: detectron2's loss ``view``s them, and channels-last RoI features (RoIPool's,
        on the channels-last CPU model) would give channels-last heatmaps it cannot view."""
        return super().layers(x).float().contiguous()

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """detectron2's forward: ``{"loss_keypoint": scalar}`` in training; in inference
        ``instances`` with ``pred_keypoints`` and ``pred_keypoint_heatmaps``."""
        if self.training:
            return super().forward(x, instances)
        keypoint_inference(self.layers(x), instances)
        return instances
