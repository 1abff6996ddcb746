"""The backbone's int8 units: each ResNet stage (and the stem) and each FPN convolution.

The FPN's top-down additions keep running in float32 (bfloat16 under "fast"'s autocast); the
RPN and RoI heads' units are in :mod:`.int8_heads`; :mod:`.int8_convert` quantizes them all.
"""

from typing import Iterator

from torch import nn

from .int8_convert import Unit

__all__ = ["backbone_units"]


def _installer(owner: nn.Module, name: str, in_list, index):
    def install(new: nn.Module):
        setattr(owner, name, new)
        if in_list is not None:  # the public list (stages, lateral_convs) forward reads
            in_list[index] = new

    return install


def backbone_units(backbone: nn.Module) -> Iterator[Unit]:
    """The bottom-up network's children (stem, res2..res5) and the FPN's convs."""
    bottom_up = getattr(backbone, "bottom_up", backbone)
    stages = getattr(bottom_up, "stages", None)
    for name, child in list(bottom_up.named_children()):
        in_list = stages if stages is not None and any(s is child for s in stages) else None
        index = [i for i, s in enumerate(in_list) if s is child][0] if in_list else None
        yield Unit(child, _installer(bottom_up, name, in_list, index))
    for list_name in ("lateral_convs", "output_convs"):
        convs = getattr(backbone, list_name, None) or []
        for index, conv in enumerate(convs):
            name = next(n for n, c in backbone.named_children() if c is conv)
            yield Unit(conv, _installer(backbone, name, convs, index))
