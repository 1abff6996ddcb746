"""The RoI and RPN heads' int8 units: the convolution and fc towers before each predictor.

Each sequential head (detectron2's box, mask and keypoint heads, which apply their children in
order) gets its fc or conv tower quantized as one unit, so activations stay int8 from its first
layer to its last and are dequantized once; the mask head's deconvolution and the predictors
(box scores and deltas, mask and keypoint logits) stay float, as does everything decoded from
them. The RPN's shared 3x3 convolution is a unit too; its two 1x1 predictors stay float.
"""

from typing import Iterator

import torch
from torch import nn

from .int8_convert import Unit
from .sequential_heads import tower_children

__all__ = ["QuantizedTower", "head_units"]


class QuantizedTower(nn.Module):
    """A quantized unit with float32 in and out that also takes an empty batch (an image
    without detections), which the int8 kernels cannot: it runs one zero RoI and returns none
    (while calibrating, that zero RoI is observed: a value the ranges already hold)."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.quantized = quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # under bfloat16 autocast the input may be bfloat16
        if x.shape[0] == 0:
            return self.quantized(x.new_zeros((1,) + x.shape[1:]))[:0]
        return self.quantized(x)


def _tower(head: nn.Module) -> Iterator[Unit]:
    # Only the tower: the mask head's deconvolution stays float (quantized by the x86 backend,
    # per-tensor weights, it cost about 9 segm AP on the shapes model).
    names = tower_children(head)
    if not names:  # not a sequential head, or e.g. the C4 mask head: deconvolution first
        return

    def install(new: nn.Module):
        # The head iterates over its children: the tower runs in the first one's place and
        # the others pass its output through.
        setattr(head, names[0], QuantizedTower(new))
        for name in names[1:]:
            setattr(head, name, nn.Identity())

    yield Unit(nn.Sequential(*(getattr(head, name) for name in names)), install)


def head_units(model: nn.Module) -> Iterator[Unit]:
    """The RPN head's shared conv and the box, mask and keypoint heads' towers."""
    rpn_head = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
    if isinstance(getattr(rpn_head, "conv", None), nn.Module):
        yield Unit(rpn_head.conv, lambda new: setattr(rpn_head, "conv", QuantizedTower(new)))
    heads = getattr(model, "roi_heads", None)
    for name in ("box_head", "mask_head", "keypoint_head"):
        head = getattr(heads, name, None)
        if head is not None:
            yield from _tower(head)
