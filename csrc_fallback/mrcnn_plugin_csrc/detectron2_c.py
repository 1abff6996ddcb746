"""Pure PyTorch stand-in for detectron2's compiled module ``detectron2._C`` (v0.6 and main).

The finder in :mod:`mrcnn_plugin_csrc.finder` hands this module out as ``detectron2._C`` when
the compiled one is missing or broken. It exposes the same names with the same call
signatures as the compiled module of detectron2 v0.6 (a superset of main's, which moved the
rotated-box ops to ``torch.ops``), and importing it registers the ``torch.ops.detectron2.*``
operators that v0.6 and main call (see :mod:`mrcnn_plugin_csrc.torch_ops`).
"""

from .coco_eval_fast import (
    COCOevalAccumulate,
    COCOevalEvaluateImages,
    ImageEvaluation,
    InstanceAnnotation,
)
from .deform_conv_ops import (
    deform_conv_backward_filter,
    deform_conv_backward_input,
    deform_conv_forward,
    modulated_deform_conv_backward,
    modulated_deform_conv_forward,
)
from .roi_align_rotated import roi_align_rotated_backward, roi_align_rotated_forward
from .rotated_iou import box_iou_rotated, nms_rotated
from .torch_ops import register_operators
from .version_info import get_compiler_version, get_cuda_version, has_cuda

IS_PURE_PYTORCH_STANDIN = True

register_operators()

__all__ = [
    "COCOevalAccumulate",
    "COCOevalEvaluateImages",
    "ImageEvaluation",
    "InstanceAnnotation",
    "box_iou_rotated",
    "deform_conv_backward_filter",
    "deform_conv_backward_input",
    "deform_conv_forward",
    "get_compiler_version",
    "get_cuda_version",
    "has_cuda",
    "modulated_deform_conv_backward",
    "modulated_deform_conv_forward",
    "nms_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_forward",
]
