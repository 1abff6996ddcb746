"""Slow, loop-per-bin reference versions of the RoI ops. Test oracle only; never used in models.

Everything is computed with Python floats (double precision) one bin and one sample at a
time, written straight from the definitions so it can be checked by reading:

* RoIAlign (paper Sec. 3): split the (scaled, possibly shifted) RoI into out_h x out_w bins,
  put grid_h x grid_w regularly spaced points in each bin, bilinearly interpolate each point,
  and average (or max) them.
* RoIPool (Fast R-CNN): round the RoI to feature cells, split it into bins with floor/ceil
  boundaries, take the max over the cells of each bin (0 for an empty bin).
* RoIWarp: round the RoI as RoIPool does, then RoIAlign it (not aligned) at scale 1.

Inputs/outputs have the same shapes as in :mod:`mrcnn_plugin.layers.roi_ops`.
"""

import math
from typing import Tuple, Union

import torch

__all__ = ["reference_roi_align", "reference_roi_pool", "reference_roi_warp"]


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _round_half_away(v: float) -> int:
    """C's round(): halves go away from zero."""
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


def bilinear_sample(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Value of ``fmap`` (C, H, W) at continuous (y, x), pixel i at coordinate i. Returns (C,).

    Points beyond one pixel outside the map read 0. Points within (-1, 0) read the border.
    Points at or past the last row/column read that row/column.
    """
    _, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[:, y0, x0]
        + hy * lx * fmap[:, y0, x1]
        + ly * hx * fmap[:, y1, x0]
        + ly * lx * fmap[:, y1, x1]
    )


def reference_roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    aggregation: str = "avg",
) -> torch.Tensor:
    """Loop version of :func:`mrcnn_plugin.layers.roi_ops.roi_align`."""
    assert aggregation in ("avg", "max")
    out_h, out_w = _pair(output_size)
    feats = input.detach().double()
    output = torch.zeros(rois.shape[0], input.shape[1], out_h, out_w, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, (b, x0, y0, x1, y1) in enumerate(rois.double().tolist()):
        fmap = feats[int(b)]
        start_x, start_y = x0 * spatial_scale - offset, y0 * spatial_scale - offset
        roi_w = x1 * spatial_scale - offset - start_x
        roi_h = y1 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        if sampling_ratio > 0:
            grid_h = grid_w = sampling_ratio
        else:
            grid_h, grid_w = math.ceil(roi_h / out_h), math.ceil(roi_w / out_w)
        for ph in range(out_h):
            for pw in range(out_w):
                samples = []
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        samples.append(bilinear_sample(fmap, y, x))
                if not samples:  # empty RoI with adaptive sampling
                    continue
                stacked = torch.stack(samples)
                if aggregation == "avg":
                    output[r, :, ph, pw] = stacked.mean(dim=0)
                else:
                    output[r, :, ph, pw] = stacked.max(dim=0).values
    return output.to(input.dtype)


def reference_roi_pool(
    input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float
) -> torch.Tensor:
    """Loop version of :func:`mrcnn_plugin.layers.roi_ops.roi_pool`."""
    out_h, out_w = _pair(output_size)
    _, _, h, w = input.shape
    feats = input.detach().double()
    output = torch.zeros(rois.shape[0], input.shape[1], out_h, out_w, dtype=torch.float64)
    for r, (b, x0, y0, x1, y1) in enumerate(rois.double().tolist()):
        fmap = feats[int(b)]
        cx0, cy0 = _round_half_away(x0 * spatial_scale), _round_half_away(y0 * spatial_scale)
        cx1, cy1 = _round_half_away(x1 * spatial_scale), _round_half_away(y1 * spatial_scale)
        # End cells are inclusive, so a one-cell RoI has size 1.
        roi_w, roi_h = max(cx1 - cx0 + 1, 1), max(cy1 - cy0 + 1, 1)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        for ph in range(out_h):
            ys = min(max(math.floor(ph * bin_h) + cy0, 0), h)
            ye = min(max(math.ceil((ph + 1) * bin_h) + cy0, 0), h)
            for pw in range(out_w):
                xs = min(max(math.floor(pw * bin_w) + cx0, 0), w)
                xe = min(max(math.ceil((pw + 1) * bin_w) + cx0, 0), w)
                if ye > ys and xe > xs:
                    output[r, :, ph, pw] = fmap[:, ys:ye, xs:xe].amax(dim=(1, 2))
    return output.to(input.dtype)


def reference_roi_warp(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aggregation: str = "avg",
) -> torch.Tensor:
    """Loop version of :func:`mrcnn_plugin.layers.roi_ops.roi_warp`."""
    quantized = [
        [b] + [float(_round_half_away(v * spatial_scale)) for v in box]
        for b, *box in rois.double().tolist()
    ]
    rois_q = torch.tensor(quantized, dtype=torch.float64).reshape(-1, 5)
    return reference_roi_align(
        input, rois_q, output_size, 1.0, sampling_ratio, aligned=False, aggregation=aggregation
    )
