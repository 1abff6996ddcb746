"""Inference modes: transforms of a built detectron2 model for fast CPU inference.

``prepare_for_inference(model, mode)`` returns an :class:`InferenceModel` wrapping ``model``
(changed in place), selected by ``MODEL.MRCNN.INFERENCE_MODE``:

* ``"exact"`` (default): float32, results equal to the untransformed model's up to float
  rounding. FrozenBatchNorm folded into the preceding convolution's weights and bias,
  channels-last activations (oneDNN's faster layout), and every average RoIAlign of the
  poolers computed by :func:`mrcnn_plugin.layers.roi_ops.roi_align_nhwc` (same sampling, one
  vectorized gather per bin instead of a serial per-channel loop); box NMS on a score-ordered
  prefix of the candidates (:mod:`mrcnn_plugin.engine.prefix_nms`, same detections); the
  ReLUs of detectron2's box, mask and keypoint heads applied in place (no new 100x256x28x28
  tensor after the mask deconvolution: same values, about 0.1 s less per image).
* ``"fast"``: exact's transforms, then bfloat16 autocast over the whole forward. The outputs
  that are decoded (RPN logits and deltas, box scores and deltas, mask and keypoint logits)
  are cast back to float32 first, so box decoding, NMS, mask pasting and keypoint decoding
  stay in float32. Needs bfloat16 units (AMX-BF16 or AVX512-BF16); otherwise it is exact.
* ``"quantized"``: fast's model (or exact's without bfloat16 units) with the ResNet stages,
  the FPN convolutions, the RPN's shared convolution and the RoI heads' towers in int8 (see
  :mod:`mrcnn_plugin.engine.int8_convert`), calibrated on a few images; the predictors and
  all decoding stay float. Needs VNNI or AMX-INT8; otherwise it falls back to fast (or exact).

A fallback logs one line. Training never goes through here: a model that is not prepared is
exactly detectron2's. Every transform uses PyTorch's public module API (attributes of
detectron2's public classes, forward hooks), none of detectron2's internals.
"""

import logging
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.layers import ROIAlign as D2ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from ..layers.roi_ops import NHWCRoIAlign, RoIAlign
from .cpu_features import cpu_has_int8, has_bf16
from .prefix_nms import PrefixNMSBoxPredictor
from .sequential_heads import SEQUENTIAL_HEADS

__all__ = [
    "INFERENCE_MODES",
    "InferenceModel",
    "fold_frozen_batchnorm",
    "in_place_head_relus",
    "prepare_for_inference",
    "resolve_mode",
    "use_nhwc_roi_align",
]

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("exact", "fast", "quantized")


def resolve_mode(mode: str, device: str = "cpu", cpuinfo: Optional[str] = None) -> str:
    """The mode that will run: ``mode`` where the CPU supports it, else the next best one
    (quantized -> fast -> exact), with one log line saying why. ``cpuinfo``: see
    :func:`mrcnn_plugin.engine.cpu_features.cpuinfo_path`."""
    if mode not in INFERENCE_MODES:
        raise ValueError(
            f"MODEL.MRCNN.INFERENCE_MODE must be one of {INFERENCE_MODES}; got {mode!r}"
        )
    if mode == "exact":
        return mode
    if not str(device).startswith("cpu"):
        logger.warning("Inference mode %r is for CPUs; running 'exact' on %s", mode, device)
        return "exact"
    bf16 = has_bf16(cpuinfo)
    if mode == "quantized" and not cpu_has_int8(cpuinfo):
        fallback = "fast" if bf16 else "exact"
        logger.warning(
            "No int8 units (VNNI/AMX-INT8) on this CPU: 'quantized' runs as %r", fallback
        )
        return fallback
    if mode == "fast" and not bf16:
        logger.warning("No bfloat16 units (AMX/AVX512-BF16) on this CPU: 'fast' runs as 'exact'")
        return "exact"
    return mode


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Folds every detectron2 ``Conv2d`` whose ``norm`` is a FrozenBatchNorm2d into the
    convolution (w * s, b * s + (beta - mean * s), s = gamma / sqrt(var + eps)) and drops the
    norm. Returns how many were folded."""
    folded = 0
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.norm, FrozenBatchNorm2d):
            norm = module.norm
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            shift = norm.bias - norm.running_mean * scale
            module.weight.mul_(scale.reshape(-1, 1, 1, 1))
            if module.bias is None:
                module.bias = nn.Parameter(shift.clone(), requires_grad=False)
            else:
                module.bias.mul_(scale).add_(shift)
            module.norm = None
            folded += 1
    return folded


def _is_avg_roi_align(op: nn.Module) -> bool:
    if isinstance(op, RoIAlign):
        return op.aggregation == "avg"
    return type(op) is D2ROIAlign


def use_nhwc_roi_align(model: nn.Module) -> int:
    """Replaces every average RoIAlign level op of the model's ROIPoolers (the plugin's or
    detectron2's) by :class:`NHWCRoIAlign` with the same settings. Returns how many."""
    replaced = 0
    for module in model.modules():
        if not isinstance(module, ROIPooler):
            continue
        for i, op in enumerate(module.level_poolers):
            if _is_avg_roi_align(op):
                size = op.output_size
                module.level_poolers[i] = NHWCRoIAlign(
                    size, op.spatial_scale, op.sampling_ratio, op.aligned
                )
                replaced += 1
    return replaced


def in_place_head_relus(model: nn.Module) -> int:
    """Makes the ReLUs of the model's sequential RoI heads in place (``nn.ReLU`` children and
    ``Conv2d`` activations that are ``nn.ReLU`` modules). Returns how many."""
    heads = getattr(model, "roi_heads", None)
    changed = 0
    for name in ("box_head", "mask_head", "keypoint_head"):
        head = getattr(heads, name, None)
        if not isinstance(head, SEQUENTIAL_HEADS):  # others may reuse a ReLU's input
            continue
        for layer in head.children():
            relu = layer if isinstance(layer, nn.ReLU) else getattr(layer, "activation", None)
            if isinstance(relu, nn.ReLU):
                relu.inplace = True
                changed += 1
    return changed


def _to_channels_last(module, args):
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, torch.Tensor) and a.dim() == 4
        else a
        for a in args
    )


def _as_float(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float(v) for v in value)
    return value


def _float_output(module, args, output):
    return _as_float(output)


def _decoded_outputs(model: nn.Module) -> Iterable[nn.Module]:
    """The layers whose outputs are decoded into boxes, masks or keypoints."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and hasattr(rpn, "rpn_head"):
        yield rpn.rpn_head
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        return
    if hasattr(heads, "box_predictor"):
        yield heads.box_predictor
    for name in ("mask_head", "keypoint_head"):
        head = getattr(heads, name, None)
        for last in ("predictor", "score_lowres"):
            if head is not None and isinstance(getattr(head, last, None), nn.Module):
                yield getattr(head, last)


class InferenceModel(nn.Module):
    """``model`` run in ``mode``: ``forward(batched_inputs)`` is the model's inference,
    without autograd, under bfloat16 autocast in the "fast" and "quantized" modes."""

    def __init__(self, model: nn.Module, mode: str, bf16: bool):
        super().__init__()
        self.model = model
        self.mode = mode
        self.bf16 = bf16

    def forward(self, batched_inputs):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with torch.no_grad(), autocast:
            return self.model(batched_inputs)


def prepare_for_inference(
    model: nn.Module,
    mode: str = "exact",
    cpuinfo: Optional[str] = None,
    calibration: Optional[list] = None,
) -> InferenceModel:
    """Transforms ``model`` (a detectron2 GeneralizedRCNN, built and loaded) in place for
    ``mode`` (see the module doc) and returns it wrapped in an :class:`InferenceModel`.

    ``calibration``: a few batched-input dicts (detectron2's format) for "quantized"'s int8
    ranges. ``cpuinfo``: see :func:`resolve_mode`.
    """
    device = next(model.parameters()).device.type
    resolved = resolve_mode(mode, device, cpuinfo)
    model.eval()
    fold_frozen_batchnorm(model)
    if device != "cpu":
        return InferenceModel(model, "exact", bf16=False)
    use_nhwc_roi_align(model)
    in_place_head_relus(model)
    heads = getattr(model, "roi_heads", None)
    if hasattr(heads, "box_predictor") and hasattr(heads.box_predictor, "predict_probs"):
        heads.box_predictor = PrefixNMSBoxPredictor(heads.box_predictor)
    model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(_to_channels_last)
    bf16 = resolved != "exact" and has_bf16(cpuinfo)
    if bf16:
        for layer in _decoded_outputs(model):
            layer.register_forward_hook(_float_output)
    if resolved == "quantized":
        from .int8_backbone import backbone_units
        from .int8_convert import quantize_units
        from .int8_heads import head_units

        if not calibration:
            raise ValueError("inference mode 'quantized' needs calibration images")
        units = [*backbone_units(model.backbone), *head_units(model)]
        quantize_units(model, units, calibration)
    logger.info("Inference mode %r (requested %r)", resolved, mode)
    return InferenceModel(model, resolved, bf16)
