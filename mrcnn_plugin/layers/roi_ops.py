"""RoI feature extraction ops (paper Sec. 3, Table 2c): RoIAlign, RoIPool and RoIWarp.

All ops take ``input`` (N, C, H, W) and ``rois`` (R, 5) rows ``[batch_index, x0, y0, x1, y1]``
in image coordinates, and return (R, C, out_h, out_w).

Sampling follows torchvision's / detectron2's kernels exactly: the average-pooled RoIAlign
is ``torchvision.ops.roi_align``, and the max-pooled variants (which torchvision lacks) run
that kernel on a finer sub-bin grid whose single samples are the RoIAlign samples, then
max-pool each bin's block. So all variants share one bilinear rule:

* a sample at (y, x) outside ``[-1, H] x [-1, W]`` contributes 0;
* otherwise negative coordinates are clamped to 0, and a coordinate at or beyond the last
  row/column reads that row/column only.
"""

from typing import Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "roi_align",
    "roi_pool",
    "roi_warp",
    "quantize_rois",
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
]

_AGGREGATIONS = ("avg", "max")
_CPU_ROI_POOL_UPCAST = (torch.bfloat16, torch.float16)

OutputSize = Union[int, Tuple[int, int]]


def _pair(output_size: OutputSize) -> Tuple[int, int]:
    if isinstance(output_size, int):
        return (output_size, output_size)
    if len(output_size) != 2:
        raise ValueError(f"output_size must be an int or (h, w); got {output_size!r}")
    return (int(output_size[0]), int(output_size[1]))


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}; got {aggregation!r}")


def _prepare_rois(input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W); got shape {tuple(input.shape)}")
    if rois.dim() != 2 or rois.size(1) != 5:
        raise ValueError(f"rois must be (R, 5) [batch, x0, y0, x1, y1]; got {tuple(rois.shape)}")
    # The kernels need rois in the feature dtype (as detectron2's ROIAlign does).
    return rois.to(dtype=input.dtype)


def _max_over_subbins(
    input: torch.Tensor,
    rois: torch.Tensor,
    out_hw: Tuple[int, int],
    grid_hw: Tuple[int, int],
    spatial_scale: float,
    aligned: bool,
) -> torch.Tensor:
    """Max of a gh x gw sample grid per bin, (R, C, out_h, out_w).

    Splitting every bin into gh x gw sub-bins and sampling each sub-bin once at its centre
    puts the samples exactly where RoIAlign's grid puts them:
    start + (p * g + i + 0.5) * roi_size / (out * g) == start + p * bin + (i + 0.5) * bin / g.
    So torchvision's kernel with sampling_ratio=1 evaluates all samples (same bilinear and
    out-of-map rules as the avg path, native CPU/CUDA forward and backward), and a
    non-overlapping max pool reduces each gh x gw block.
    """
    (out_h, out_w), (gh, gw) = out_hw, grid_hw
    samples = torchvision.ops.roi_align(
        input, rois, (out_h * gh, out_w * gw), spatial_scale, 1, aligned
    )
    return F.max_pool2d(samples, kernel_size=(gh, gw), stride=(gh, gw))


def _roi_geometry(rois: torch.Tensor, spatial_scale: float, aligned: bool):
    """(x0, y0, width, height) of each RoI in feature coordinates, as the kernels compute them:
    shifted by -0.5 when ``aligned``, else Detectron's legacy minimum size of 1x1."""
    offset = 0.5 if aligned else 0.0
    x0, y0 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - x0
    roi_h = (rois[:, 4] * spatial_scale - offset) - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    return x0, y0, roi_w, roi_h


def _adaptive_grid(roi_size: torch.Tensor, out: int) -> torch.Tensor:
    """The kernels' samples per bin along one axis for sampling_ratio <= 0."""
    return torch.ceil(roi_size / out).clamp(min=0).long()


def _roi_align_max(
    input: torch.Tensor,
    rois: torch.Tensor,
    out_hw: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    if sampling_ratio > 0:
        grid = (sampling_ratio, sampling_ratio)
        return _max_over_subbins(input, rois, out_hw, grid, spatial_scale, aligned)

    # Adaptive: each RoI has its own grid ceil(roi_size / out_size), computed as the kernel
    # does. RoIs are grouped by grid size, one vectorized call per group; bins of an empty
    # RoI (grid 0) have no samples and stay 0, as torchvision's average gives.
    out_h, out_w = out_hw
    _, _, roi_w, roi_h = _roi_geometry(rois, spatial_scale, aligned)
    grid_h, grid_w = _adaptive_grid(roi_h, out_h), _adaptive_grid(roi_w, out_w)

    output = input.new_zeros((rois.shape[0], input.shape[1], out_h, out_w))
    # Adding an empty sum (exactly 0) keeps the result in input's autograd graph even when
    # no RoI has samples, like the avg path's output.
    output = output + input.reshape(-1)[:0].sum()
    if rois.shape[0] == 0:
        return output
    grids, group_of = torch.unique(torch.stack([grid_h, grid_w], dim=1), dim=0, return_inverse=True)
    for g, (gh, gw) in enumerate(grids.tolist()):
        if gh == 0 or gw == 0:
            continue
        sel = torch.nonzero(group_of == g).squeeze(1)
        pooled = _max_over_subbins(input, rois[sel], out_hw, (gh, gw), spatial_scale, aligned)
        output = output.index_put((sel,), pooled)  # out of place: keeps autograd simple
    return output


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: OutputSize,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    aggregation: str = "avg",
) -> torch.Tensor:
    """RoIAlign: bilinear samples on a regular grid in each bin, averaged or max-ed.

    Args:
        input: (N, C, H, W) features.
        rois: (R, 5) ``[batch_index, x0, y0, x1, y1]`` in image coordinates.
        output_size: int or (out_h, out_w).
        spatial_scale: feature/image scale (1 / stride).
        sampling_ratio: samples per bin per axis; <= 0 means ceil(roi_size / out_size).
        aligned: shift RoIs by -0.5 feature pixel (detectron2 ROIAlignV2). False is the paper's
            RoIAlign, with Detectron's minimum RoI size of 1.
        aggregation: "avg" (the paper's) or "max" over the samples of a bin.

    Returns:
        (R, C, out_h, out_w) tensor.
    """
    _check_aggregation(aggregation)
    out_hw = _pair(output_size)
    rois = _prepare_rois(input, rois)
    if aggregation == "avg":
        return torchvision.ops.roi_align(
            input, rois, out_hw, spatial_scale, int(sampling_ratio), bool(aligned)
        )
    return _roi_align_max(input, rois, out_hw, spatial_scale, int(sampling_ratio), bool(aligned))


def roi_pool(
    input: torch.Tensor, rois: torch.Tensor, output_size: OutputSize, spatial_scale: float
) -> torch.Tensor:
    """RoIPool (Fast R-CNN): RoI rounded to the feature grid, bins quantized, max per bin.

    Shapes as in :func:`roi_align`.
    """
    if input.device.type == "cpu" and input.dtype in _CPU_ROI_POOL_UPCAST:
        # torchvision has no CPU roi_pool kernel for these dtypes (bfloat16 autocast). Every
        # bf16/fp16 value is exact in float32 and a max selects one of them, so pooling in
        # float32 and casting back is exact; the RoIs stay float32 so they are not rounded.
        _prepare_rois(input, rois)  # shape checks
        pooled = torchvision.ops.roi_pool(
            input.float(), rois.float(), _pair(output_size), spatial_scale
        )
        return pooled.to(input.dtype)
    rois = _prepare_rois(input, rois)
    return torchvision.ops.roi_pool(input, rois, _pair(output_size), spatial_scale)


def quantize_rois(rois: torch.Tensor, spatial_scale: float) -> torch.Tensor:
    """Maps (R, 5) rois to feature coordinates rounded as RoIPool does.

    RoIPool's kernel uses C's ``round`` (half away from zero), not ``torch.round`` (half to
    even), so it is spelled out here. The batch index column is kept. Returns (R, 5).
    """
    # float64 product like the kernel's (float coordinate times double scale).
    scaled = rois[:, 1:].double() * spatial_scale
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return torch.cat([rois[:, :1], rounded.to(rois.dtype)], dim=1)


def roi_warp(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: OutputSize,
    spatial_scale: float,
    sampling_ratio: int,
    aggregation: str = "avg",
) -> torch.Tensor:
    """RoIWarp (MNC): quantize the RoI to the feature grid, then sample bins bilinearly.

    The quantized box spans feature coordinates [round(x0 * s), round(x1 * s)] (same for y)
    and is then sampled exactly as non-aligned RoIAlign at scale 1. Only the RoI boundary is
    quantized; bin boundaries are not, which is what separates it from RoIPool.
    Shapes and arguments as in :func:`roi_align`.
    """
    _check_aggregation(aggregation)
    rois = _prepare_rois(input, rois)
    return roi_align(
        input,
        quantize_rois(rois, spatial_scale),
        output_size,
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=False,
        aggregation=aggregation,
    )


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`; ``forward(input (N,C,H,W), rois (R,5))``."""

    def __init__(
        self,
        output_size: OutputSize,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = True,
        aggregation: str = "avg",
    ):
        super().__init__()
        _check_aggregation(aggregation)
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.aggregation = aggregation

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            self.aggregation,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
            f"aggregation={self.aggregation!r}"
        )


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`; ``forward(input (N,C,H,W), rois (R,5))``."""

    def __init__(self, output_size: OutputSize, spatial_scale: float):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIWarp(nn.Module):
    """Module form of :func:`roi_warp`; ``forward(input (N,C,H,W), rois (R,5))``."""

    def __init__(
        self,
        output_size: OutputSize,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aggregation: str = "avg",
    ):
        super().__init__()
        _check_aggregation(aggregation)
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aggregation = aggregation

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_warp(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aggregation,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aggregation={self.aggregation!r}"
        )


def _axis_taps(start, bin_size, grid, out: int, size: int, max_grid: int):
    """1-D bilinear taps of RoIAlign's samples along one axis, as torchvision's kernel
    computes them: (R, out, max_grid * 2) indices and weights, the weights divided by the
    RoI's ``grid`` (the axis' share of the bin average) and 0 for samples outside the map."""
    bins = torch.arange(out, dtype=start.dtype, device=start.device)
    slots = torch.arange(max_grid, dtype=start.dtype, device=start.device)
    g = grid.to(start.dtype).clamp(min=1)[:, None, None]
    step = bin_size[:, None, None]
    pos = start[:, None, None] + bins[None, :, None] * step + (slots + 0.5) * (step / g)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.long()  # pos >= 0: truncation is floor, as the kernel's (int) cast
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    frac = torch.where(at_edge, 0.0, pos - low)
    high = torch.where(at_edge, low, low + 1)
    scale = valid / g
    index = torch.stack([low, high], dim=-1).flatten(2)
    weight = torch.stack([(1 - frac) * scale, frac * scale], dim=-1).flatten(2)
    return index, weight


def roi_align_nhwc(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: OutputSize,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> torch.Tensor:
    """Average RoIAlign with torchvision's sampling rule (see the module doc), computed as
    one weighted gather-sum of channel vectors per bin (``F.embedding_bag``).

    torchvision's CPU kernel walks every channel of every RoI serially; here the bilinear
    taps of a bin are computed once, and each tap reads a contiguous C-vector of the map in
    channels-last layout, so the sum is vectorized over channels, runs on all intra-op
    threads, and works in the input's dtype (bfloat16 included) without an upcast. The
    summation order differs from torchvision's, so outputs agree to float rounding.
    Inference only (no autograd to ``rois``). Shapes as in :func:`roi_align`; the result is
    (R, C, out_h, out_w) in channels-last memory format.
    """
    out_h, out_w = _pair(output_size)
    n, c, height, width = input.shape
    r = rois.shape[0]
    if r == 0 or input.numel() == 0:
        return input.new_zeros((r, c, out_h, out_w))
    table = input.permute(0, 2, 3, 1).reshape(n * height * width, c)  # a view if NHWC
    boxes = rois.float()  # sample positions in float32, as the kernel for every dtype
    x0, y0, roi_w, roi_h = _roi_geometry(boxes, spatial_scale, aligned)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if sampling_ratio > 0:
        grid_h = torch.full((r,), sampling_ratio, dtype=torch.long, device=rois.device)
        grid_w = grid_h
    else:
        grid_h, grid_w = _adaptive_grid(roi_h, out_h), _adaptive_grid(roi_w, out_w)
    # RoIs with like grids share one set of tap shapes (a few groups per level); the groups'
    # bags go to one embedding_bag call in grouped order, then back to the RoIs' order.
    key = grid_h.clamp(min=1) * (int(grid_w.max()) + 2) + grid_w.clamp(min=1)
    order = torch.argsort(key, stable=True)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    indices, weights, lengths = [], [], []
    begin = 0
    for size in counts.tolist():
        sel = order[begin : begin + size]
        begin += size
        gh, gw = max(int(grid_h[sel[0]]), 1), max(int(grid_w[sel[0]]), 1)
        iy, wy = _axis_taps(y0[sel], bin_h[sel], grid_h[sel], out_h, height, gh)
        ix, wx = _axis_taps(x0[sel], bin_w[sel], grid_w[sel], out_w, width, gw)
        base = boxes[sel, 0].long() * (height * width)
        # (R, out_h, out_w, 2 gh, 2 gw) taps of each bin.
        rows = (base[:, None, None] + iy * width)[:, :, None, :, None]
        indices.append((rows + ix[:, None, :, None, :]).flatten())
        weights.append((wy[:, :, None, :, None] * wx[:, None, :, None, :]).flatten())
        lengths.append(torch.full((size * out_h * out_w,), 4 * gh * gw, dtype=torch.long))
    lengths = torch.cat(lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    pooled = F.embedding_bag(
        torch.cat(indices),
        table,
        offsets.to(rois.device),
        mode="sum",
        per_sample_weights=torch.cat(weights).to(table.dtype),
    )
    pooled = pooled.view(r, out_h, out_w, c)
    if len(counts) > 1:
        pooled = pooled.index_select(0, torch.argsort(order))
    return pooled.permute(0, 3, 1, 2)


class NHWCRoIAlign(nn.Module):
    """Module form of :func:`roi_align_nhwc` (average RoIAlign for inference), with the
    attributes of :class:`RoIAlign`; ``forward(input (N,C,H,W), rois (R,5))``."""

    def __init__(
        self,
        output_size: OutputSize,
        spatial_scale: float,
        sampling_ratio: int = 0,
        aligned: bool = True,
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        rois = _prepare_rois(input, rois)
        return roi_align_nhwc(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
