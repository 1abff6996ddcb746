"""detectron2's sequential RoI heads: the box, mask and keypoint heads whose forward applies
their children in order, each to the previous one's output (subclasses included).

Their first children form a tower that maps RoI features to RoI features (the box head's fcs,
the mask and keypoint heads' convs); the rest upsample or predict.
"""

from typing import List

from detectron2.modeling.roi_heads import (
    FastRCNNConvFCHead,
    KRCNNConvDeconvUpsampleHead,
    MaskRCNNConvUpsampleHead,
)
from torch import nn

__all__ = ["SEQUENTIAL_HEADS", "tower_children"]

# (head class, its first child after the tower; None: every child is in the tower)
_TOWER_ENDS = (
    (FastRCNNConvFCHead, None),
    (MaskRCNNConvUpsampleHead, "deconv"),
    (KRCNNConvDeconvUpsampleHead, "score_lowres"),
)
SEQUENTIAL_HEADS = tuple(head_class for head_class, _ in _TOWER_ENDS)


def tower_children(head: nn.Module) -> List[str]:
    """The names of ``head``'s tower children, in order; empty for a head that is not
    sequential or has no tower (the C4 mask head: its deconvolution comes first)."""
    for head_class, tower_end in _TOWER_ENDS:
        if isinstance(head, head_class):
            names: List[str] = []
            for name, _ in head.named_children():
                if name == tower_end:
                    break
                names.append(name)
            return names
    return []
