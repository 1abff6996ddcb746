"""int8 ResNet stages and FPN convolutions for the "quantized" inference mode.

PyTorch's FX graph-mode post-training quantization (``torch.ao.quantization.quantize_fx``)
with the "x86" backend's default config: per-channel symmetric int8 weights, per-tensor uint8
activations observed by histogram on a few calibration images, convolutions fused with their
ReLU and residual add where the graph allows, run by oneDNN/FBGEMM kernels that use VNNI and
AMX-INT8. detectron2's ``Conv2d`` is first turned into ``nn.Conv2d`` (FrozenBatchNorm already
folded into it) followed by its other norm, if any (GroupNorm becomes a quantized GroupNorm,
BatchNorm is fused into the convolution), which FX can trace. Each ResNet stage and each FPN
conv becomes one quantized module with float32 in and out, so the FPN's top-down additions, the
RPN and the RoI heads keep running in float32 (bfloat16 under "fast"'s autocast).

detectron2's blocks apply their ReLUs in place (``F.relu_``), a call the x86 backend's fusion
patterns do not match: each would run as dequantize -> float ReLU -> quantize between int8
convolutions. The unit's traced graph therefore gets an out-of-place ReLU wherever the in-place
one's input has no other user (the same values), which FX fuses into the preceding convolution
or residual add.
"""

from typing import List

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import fx, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

__all__ = ["out_of_place_relus", "plain_convs", "quantize_backbone"]


@torch.no_grad()
def _as_plain(conv: Conv2d) -> nn.Module:
    if isinstance(conv.norm, FrozenBatchNorm2d):
        raise ValueError("quantize_backbone needs FrozenBatchNorm folded (fold_frozen_batchnorm)")
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    )  # fmt: skip
    plain.weight.copy_(conv.weight)
    plain.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
    layers = [plain.to(memory_format=torch.channels_last)]
    if conv.norm is not None:
        layers.append(conv.norm)
    if conv.activation in (torch.relu, nn.functional.relu, nn.functional.relu_):
        layers.append(nn.ReLU())
    elif conv.activation is not None:
        raise ValueError(f"cannot quantize a Conv2d with activation {conv.activation!r}")
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def plain_convs(module: nn.Module) -> nn.Module:
    """Replaces detectron2 ``Conv2d`` modules in ``module`` (and ``module`` itself) by
    ``nn.Conv2d`` (+ its norm, + ``nn.ReLU``) with the same weights; returns the new ``module``."""
    if isinstance(module, Conv2d):
        return _as_plain(module)
    for name, child in module.named_children():
        setattr(module, name, plain_convs(child))
    return module


def _is_in_place_relu(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in (torch.relu_, nn.functional.relu_):
        return True
    return node.target is nn.functional.relu and node.kwargs.get("inplace", False)


def out_of_place_relus(unit: nn.Module) -> fx.GraphModule:
    """``unit`` traced, each in-place ReLU whose input has no other user made out of place."""
    traced = fx.symbolic_trace(unit)
    for node in traced.graph.nodes:
        if _is_in_place_relu(node) and len(node.args[0].users) == 1:
            node.target, node.kwargs = nn.functional.relu, {}
    traced.graph.lint()
    traced.recompile()
    return traced


def _quantizable_units(backbone: nn.Module):
    """(owner, attribute name, public list holding it or None, index) of each unit to
    quantize: the bottom-up network's children (stem, res2..res5) and the FPN's convs."""
    bottom_up = getattr(backbone, "bottom_up", backbone)
    stages = getattr(bottom_up, "stages", None)
    for name, child in bottom_up.named_children():
        in_list = stages if stages is not None and any(s is child for s in stages) else None
        index = [i for i, s in enumerate(in_list) if s is child][0] if in_list else None
        yield bottom_up, name, in_list, index
    for list_name in ("lateral_convs", "output_convs"):
        convs = getattr(backbone, list_name, None) or []
        for index, conv in enumerate(convs):
            name = next(n for n, c in backbone.named_children() if c is conv)
            yield backbone, name, convs, index


def _replace(owner, name, in_list, index, new):
    setattr(owner, name, new)
    if in_list is not None:
        in_list[index] = new


def quantize_backbone(model: nn.Module, calibration: List[dict], bf16: bool = False) -> int:
    """Quantizes ``model.backbone`` in place (see the module doc), observing activation
    ranges on ``calibration`` (batched-input dicts) run through the whole float32 model.
    Returns how many units were quantized."""
    torch.backends.quantized.engine = "x86"
    qconfig = get_default_qconfig_mapping("x86")
    units = list(_quantizable_units(model.backbone))
    prepared = []
    for owner, name, in_list, index in units:
        unit = out_of_place_relus(plain_convs(getattr(owner, name)).eval())
        example = None  # FX traces symbolically; the example only guides some backends
        unit = prepare_fx(unit, qconfig, example_inputs=(example,))
        _replace(owner, name, in_list, index, unit)
        prepared.append((owner, name, in_list, index, unit))
    with torch.no_grad():
        for inputs in calibration:
            model([inputs])
    for owner, name, in_list, index, unit in prepared:
        _replace(owner, name, in_list, index, convert_fx(unit))
    return len(prepared)
