"""ROI heads with a separate pooler per branch (FPN, DC5, C5): paper Fig. 4 right.

detectron2's ``StandardROIHeads.from_config`` builds every branch; the plugin only swaps each
pooler it built for a :class:`MultiLevelRoIPooler` whose op comes from ``MODEL.MRCNN.ROI_OP``
(per branch, Table 2c). A branch with ``POOLER_TYPE: ""`` keeps detectron2's contract: no
pooler, its head receives the dict of feature maps (e.g. PointRend's mask head). Proposal
sampling, the train/infer flow and the state_dict names are detectron2's, so its checkpoints
load unchanged.
"""

from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads

from ..poolers import build_pooler_from_config

__all__ = ["MRCNNStandardROIHeads"]

_BRANCHES = (("box", "ROI_BOX_HEAD"), ("mask", "ROI_MASK_HEAD"), ("keypoint", "ROI_KEYPOINT_HEAD"))


@ROI_HEADS_REGISTRY.register()
class MRCNNStandardROIHeads(StandardROIHeads):
    """detectron2's StandardROIHeads with the plugin's poolers.

    Box branch: pooler (ROI_BOX_HEAD.POOLER_RESOLUTION, 7x7 for FPN) -> box head from
    ROI_BOX_HEAD_REGISTRY -> FastRCNNOutputLayers. Mask and keypoint branches: pooler
    (POOLER_RESOLUTION, 14x14) -> a head from ROI_MASK_HEAD_REGISTRY / ROI_KEYPOINT_HEAD_REGISTRY
    (the plugin's or anyone's), or no pooler and the feature dict if POOLER_TYPE is "".
    """

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        for branch, head_key in _BRANCHES:
            if ret.get(f"{branch}_pooler") is not None:  # detectron2 built one
                in_features = ret[f"{branch}_in_features"]
                pooler = build_pooler_from_config(cfg, head_key, input_shape, in_features)
                ret[f"{branch}_pooler"] = pooler
        return ret
