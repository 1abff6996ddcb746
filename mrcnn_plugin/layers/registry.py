"""ROI_OP_REGISTRY: the RoI feature extractors selectable by ``MODEL.MRCNN.ROI_OP.NAME``.

Every registered class takes the same keyword arguments, so a config can swap them::

    cls(output_size, spatial_scale, sampling_ratio=..., aligned=..., aggregation=...)

and rejects combinations it cannot honour with a ``ValueError`` rather than silently
computing something else (e.g. RoIPool with "avg").
"""

from detectron2.utils.registry import Registry

from .roi_ops import RoIAlign, RoIPool, RoIWarp

__all__ = ["ROI_OP_REGISTRY", "MRCNNRoIAlign", "MRCNNRoIPool", "MRCNNRoIWarp"]

ROI_OP_REGISTRY = Registry("MRCNN_ROI_OP")
ROI_OP_REGISTRY.__doc__ = """
RoI feature extraction ops (paper Table 2c). Registered objects are nn.Module classes
constructed as ``cls(output_size, spatial_scale, sampling_ratio=, aligned=, aggregation=)`` and
called as ``module(features (N, C, H, W), rois (R, 5)) -> (R, C, out_h, out_w)``.
"""


@ROI_OP_REGISTRY.register()
class MRCNNRoIAlign(RoIAlign):
    """RoIAlign; aligned=False is the paper's, aligned=True detectron2's ROIAlignV2."""

    def __init__(
        self,
        output_size,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = True,
        aggregation: str = "avg",
    ):
        super().__init__(output_size, spatial_scale, sampling_ratio, aligned, aggregation)


@ROI_OP_REGISTRY.register()
class MRCNNRoIPool(RoIPool):
    """RoIPool. It always quantizes and max-pools, so only aligned=False, aggregation="max"
    are accepted; sampling_ratio has no meaning for it and is ignored."""

    def __init__(
        self,
        output_size,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = False,
        aggregation: str = "max",
    ):
        if aggregation != "max" or aligned:
            raise ValueError(
                "MRCNNRoIPool quantizes RoIs and max-pools cells: it supports only "
                f"aligned=False and aggregation='max' (got aligned={aligned!r}, "
                f"aggregation={aggregation!r}). Set MODEL.MRCNN.ROI_OP.ALIGNED=False and "
                "MODEL.MRCNN.ROI_OP.AGGREGATION='max'."
            )
        del sampling_ratio  # accepted for a uniform constructor, unused by RoIPool
        super().__init__(output_size, spatial_scale)


@ROI_OP_REGISTRY.register()
class MRCNNRoIWarp(RoIWarp):
    """RoIWarp (quantized RoI, bilinear bins). It is unaligned by definition, so
    aligned=True is rejected; aggregation is "avg" or "max"."""

    def __init__(
        self,
        output_size,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = False,
        aggregation: str = "avg",
    ):
        if aligned:
            raise ValueError(
                "MRCNNRoIWarp rounds RoIs to the feature grid, so a half-pixel alignment shift "
                "does not apply: it supports only aligned=False. Set "
                "MODEL.MRCNN.ROI_OP.ALIGNED=False."
            )
        super().__init__(output_size, spatial_scale, sampling_ratio, aggregation)
