"""int8 post-training quantization of a model's float units, for the "quantized" inference mode.

PyTorch's FX graph-mode post-training quantization (``torch.ao.quantization.quantize_fx``)
with the "x86" backend's default config: per-channel symmetric int8 weights, per-tensor uint8
activations observed by histogram on a few calibration images, convolutions and linear layers
fused with their ReLU and residual add where the graph allows, run by oneDNN/FBGEMM kernels
that use VNNI and AMX-INT8 where the CPU has them. Each :class:`Unit` (a ResNet stage, an FPN
conv, a RoI head's tower: see :mod:`.int8_backbone` and :mod:`.int8_heads`) becomes one
quantized module with float32 in and out, installed where the float one was.

detectron2's ``Conv2d`` is first turned into ``nn.Conv2d`` (FrozenBatchNorm already folded
into it) followed by its other norm, if any (GroupNorm becomes a quantized GroupNorm,
BatchNorm is fused into the convolution), which FX can trace. detectron2 applies many ReLUs
in place (``F.relu_``, ``nn.ReLU(inplace=True)``), calls the x86 backend's fusion patterns do
not match: each would run as dequantize -> float ReLU -> quantize. The traced graph therefore
gets an out-of-place ReLU wherever the in-place one's input has no other user (the same
values), which FX fuses into the preceding convolution, linear layer or residual add.
"""

import gc
from typing import Callable, Iterable, List, NamedTuple

import torch
import torch.ao.quantization.fx.utils as quantization_fx_utils
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import fx, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

__all__ = ["Unit", "out_of_place_relus", "plain_convs", "quantize_units"]


class Unit(NamedTuple):
    """A float module to quantize and how to put its replacement where it was."""

    module: nn.Module
    install: Callable[[nn.Module], None]


_RELUS = (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)


@torch.no_grad()
def _as_plain(conv: Conv2d) -> nn.Module:
    if isinstance(conv.norm, FrozenBatchNorm2d):
        raise ValueError("int8 quantization needs FrozenBatchNorm folded (fold_frozen_batchnorm)")
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    )  # fmt: skip
    plain.weight.copy_(conv.weight)
    plain.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
    layers = [plain.to(memory_format=torch.channels_last)]
    if conv.norm is not None:
        layers.append(conv.norm)
    # The heads' activations may be nn.ReLU modules (made in place by in_place_head_relus).
    if conv.activation in _RELUS or isinstance(conv.activation, nn.ReLU):
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
    """``unit`` traced, each in-place ReLU whose input has no other user made out of place
    (``nn.ReLU(inplace=True)`` modules become out-of-place ones: FX traces them as modules)."""
    for module in unit.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    traced = fx.symbolic_trace(unit)
    for node in traced.graph.nodes:
        if _is_in_place_relu(node) and len(node.args[0].users) == 1:
            node.target, node.kwargs = nn.functional.relu, {}
    traced.graph.lint()
    traced.recompile()
    return traced


def quantize_units(model: nn.Module, units: Iterable[Unit], calibration: List[dict]) -> int:
    """Quantizes each unit of ``model`` in place, observing activation ranges on
    ``calibration`` (batched-input dicts) run through the whole float32 model. Returns how
    many units were quantized."""
    torch.backends.quantized.engine = "x86"
    qconfig = get_default_qconfig_mapping("x86")
    prepared = []
    for unit in units:
        traced = out_of_place_relus(plain_convs(unit.module).eval())
        # FX traces symbolically; the example input only guides some backends.
        observed = prepare_fx(traced, qconfig, example_inputs=(None,))
        unit.install(observed)
        prepared.append((unit, observed))
    with torch.no_grad():
        for inputs in calibration:
            model([inputs])
    for unit, observed in prepared:
        unit.install(_without_node_meta(convert_fx(observed)))
    count = len(prepared)
    prepared.clear()
    _release_observed_units()
    return count


def _without_node_meta(converted: fx.GraphModule) -> fx.GraphModule:
    # The converted graph's node.meta keeps each node's qconfig, whose observer factories
    # close over the float module: without this the float weights stay alive beside the int8
    # ones. meta only informs graph passes; the generated forward never reads it.
    for node in converted.graph.nodes:
        node.meta.clear()
    return converted


def _release_observed_units() -> None:
    """Frees the float, observed units once converted. ``torch.ao.quantization.fx.utils.
    assert_and_get_unique_device`` is a ``functools.cache`` keyed by module, so it keeps every
    module prepare_fx and convert_fx saw alive: the observed units and their observers. With
    node.meta cleared too, Keypoint R-CNN R50-FPN keeps 54 MiB of float tensors, not 266."""
    cached = getattr(quantization_fx_utils.assert_and_get_unique_device, "cache_clear", None)
    if cached is not None:
        cached()
    gc.collect()  # the observers' factories and their modules form reference cycles
