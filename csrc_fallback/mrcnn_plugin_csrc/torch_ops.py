"""Registers the ``torch.ops.detectron2.*`` operators that detectron2's Python calls directly.

detectron2 v0.6 calls ``torch.ops.detectron2.nms_rotated``; detectron2 main also calls
``box_iou_rotated``, ``roi_align_rotated_forward`` and ``roi_align_rotated_backward`` that way
(its compiled ``_C`` registers them with ``TORCH_LIBRARY`` when it loads). The stand-in defines
the same operators through the public ``torch.library`` API with the schemas the C++
signatures give, once, and never over an operator that already exists (for example one a real
compiled ``_C`` loaded in the same process registered).
"""

import torch

from .roi_align_rotated import roi_align_rotated_backward, roi_align_rotated_forward
from .rotated_iou import box_iou_rotated, nms_rotated

NAMESPACE = "detectron2"
# name -> (schema, implementation). C++ double / int64_t are "float" / "int" in schemas.
OPERATORS = {
    "nms_rotated": (
        "nms_rotated(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        nms_rotated,
    ),
    "box_iou_rotated": (
        "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
        box_iou_rotated,
    ),
    "roi_align_rotated_forward": (
        "roi_align_rotated_forward(Tensor input, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int sampling_ratio) -> Tensor",
        roi_align_rotated_forward,
    ),
    "roi_align_rotated_backward": (
        "roi_align_rotated_backward(Tensor grad, Tensor rois, float spatial_scale, "
        "int pooled_height, int pooled_width, int batch_size, int channels, int height, "
        "int width, int sampling_ratio) -> Tensor",
        roi_align_rotated_backward,
    ),
}
# The Library object must stay alive: dropping it would unregister the operators.
_LIBRARY = None


def is_registered(name):
    """Whether ``torch.ops.detectron2.<name>`` exists, whoever registered it."""
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_operators():
    """Defines every missing operator of OPERATORS; returns the names it defined."""
    global _LIBRARY
    missing = [name for name in OPERATORS if not is_registered(name)]
    if not missing:
        return []
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name in missing:
        schema, fn = OPERATORS[name]
        _LIBRARY.define(schema)
        # Composite-implicit, like the C++ ops' catch-all kernels: one implementation for every
        # backend (it only uses torch ops). nms/IoU outputs carry no gradient (they detach), and
        # ROIAlignRotated stays differentiable through autograd.
        _LIBRARY.impl(name, fn, "CompositeImplicitAutograd")
    return missing
