"""Registers ``torch.ops.detectron2.nms_rotated``, which detectron2's Python calls directly.

The compiled ``_C`` registers that operator when it loads; the stand-in does the same, once,
and never over an existing registration (e.g. from a real build loaded in the same process).
"""

import torch

from .rotated_iou import nms_rotated

SCHEMA = "nms_rotated(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
# The Library must stay alive: dropping it would unregister the operator.
_LIBRARY = None


def _is_registered():
    try:
        torch.ops.detectron2.nms_rotated  # noqa: B018 (attribute lookup raises if missing)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_nms_rotated():
    """Defines detectron2::nms_rotated with one implementation for every backend."""
    global _LIBRARY
    if _LIBRARY is not None or _is_registered():
        return
    library = torch.library.Library("detectron2", "FRAGMENT")
    library.define(SCHEMA)
    # Composite-explicit: the same Python code serves CPU and CUDA tensors (it only uses torch
    # ops); the output is integer indices, so no autograd formula is needed.
    library.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
    _LIBRARY = library
