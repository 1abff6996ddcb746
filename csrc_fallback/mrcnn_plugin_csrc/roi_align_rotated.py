"""ROIAlignRotated forward and backward with the semantics of detectron2's kernels.

Each output bin (ph, pw) of a roi averages a grid of bilinear samples. Sample points are laid
out in the roi's own frame (half-pixel aligned, centred on the roi), turned by the roi angle
about its centre, and read from the feature map with detectron2's border rules: a point more
than one pixel outside the map reads 0, points in the last pixel row/column read that row.
With ``sampling_ratio <= 0`` the grid per bin is ``ceil(roi_size / pooled_size)`` per axis,
so rois are processed in groups that share a grid size.
"""

import math

import torch

# Bound on (rois x samples x channels) elements gathered at once; only limits peak memory.
_ELEMENTS_PER_CHUNK = 1 << 24


def _bilinear_taps(y, x, height, width):
    """Four-neighbour indices and weights of sample points.

    Args:
        y, x: (...) sample coordinates in feature-map pixels (pixel centres at integers).
    Returns:
        flat indices into an (height * width) map, (..., 4) int64, and weights (..., 4).
    """
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y_low = y.floor().long().clamp(max=height - 1)
    x_low = x.floor().long().clamp(max=width - 1)
    y_edge = y_low >= height - 1
    x_edge = x_low >= width - 1
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    # On the last row/column the sample snaps onto it (weight 1 on the low neighbour).
    ly = torch.where(y_edge, torch.zeros_like(y), y - y_low.to(y.dtype))
    lx = torch.where(x_edge, torch.zeros_like(x), x - x_low.to(x.dtype))
    hy, hx = 1 - ly, 1 - lx
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)
    weights = weights.masked_fill(outside[..., None], 0)
    index = torch.stack(
        [
            y_low * width + x_low,
            y_low * width + x_high,
            y_high * width + x_low,
            y_high * width + x_high,
        ],
        dim=-1,
    )
    return index, weights


def _grid_sizes(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    """Samples per bin along y and x for each roi: two (R,) int64 tensors."""
    if sampling_ratio > 0:
        full = torch.full((len(rois),), sampling_ratio, dtype=torch.long, device=rois.device)
        return full, full
    height = rois[:, 4] * spatial_scale
    width = rois[:, 3] * spatial_scale
    return (
        torch.ceil(height / pooled_height).long(),
        torch.ceil(width / pooled_width).long(),
    )


def _kernel_scale(spatial_scale):
    """The C++ interface hands spatial_scale on as a C float: round it the same way."""
    return float(torch.tensor(spatial_scale, dtype=torch.float32))


def _sample_plan(rois, spatial_scale, pooled_height, pooled_width, grid_h, grid_w, height, width):
    """Taps of every sample of rois sharing one grid size, in the kernel's arithmetic order.

    Args:
        rois: (R, 6) rows (batch_index, cx, cy, w, h, angle_degrees) in image coordinates.
    Returns:
        index (R, PH, gh, PW, gw, 4) into the (H * W) map, and matching weights.
    """
    dtype, device = rois.dtype, rois.device
    center_x = rois[:, 1] * spatial_scale - 0.5
    center_y = rois[:, 2] * spatial_scale - 0.5
    roi_w = rois[:, 3] * spatial_scale
    roi_h = rois[:, 4] * spatial_scale
    # The kernel forms the angle in double, rounds it to the dtype, then takes cos/sin of it.
    theta = (rois[:, 5].double() * math.pi / 180.0).to(dtype).double()
    cos, sin = torch.cos(theta).to(dtype), torch.sin(theta).to(dtype)
    bin_h = roi_h / pooled_height
    bin_w = roi_w / pooled_width
    # Offsets from the roi centre, in the roi frame: yy (R, PH, gh), xx (R, PW, gw), each
    # start + p * bin + ((i + 0.5) * bin) / grid.
    ph = torch.arange(pooled_height, dtype=dtype, device=device)[None, :, None]
    pw = torch.arange(pooled_width, dtype=dtype, device=device)[None, :, None]
    iy = (torch.arange(grid_h, dtype=dtype, device=device) + 0.5)[None, None, :]
    ix = (torch.arange(grid_w, dtype=dtype, device=device) + 0.5)[None, None, :]
    bh, bw = bin_h[:, None, None], bin_w[:, None, None]
    yy = ((-roi_h / 2)[:, None, None] + ph * bh) + (iy * bh) / grid_h
    xx = ((-roi_w / 2)[:, None, None] + pw * bw) + (ix * bw) / grid_w
    yy = yy[:, :, :, None, None]
    xx = xx[:, None, None, :, :]
    c = cos[:, None, None, None, None]
    s = sin[:, None, None, None, None]
    y = yy * c - xx * s + center_y[:, None, None, None, None]
    x = yy * s + xx * c + center_x[:, None, None, None, None]
    return _bilinear_taps(y, x, height, width)


def _groups(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels):
    """Yields (roi_ids, grid_h, grid_w) for chunks of rois that share a grid size."""
    if bool((rois[:, 3:5] * spatial_scale < 0).any()):
        raise RuntimeError("ROIs in ROIAlignRotated do not have non-negative size!")
    grid_h, grid_w = _grid_sizes(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio)
    keys = torch.stack([grid_h, grid_w], dim=1)
    for key in torch.unique(keys, dim=0).tolist():
        gh, gw = int(key[0]), int(key[1])
        if gh <= 0 or gw <= 0:
            continue  # an empty grid averages nothing: the output stays 0
        ids = ((grid_h == gh) & (grid_w == gw)).nonzero(as_tuple=True)[0]
        per_roi = pooled_height * pooled_width * gh * gw * 4 * max(channels, 1)
        step = max(1, _ELEMENTS_PER_CHUNK // per_roi)
        for start in range(0, len(ids), step):
            yield ids[start : start + step], gh, gw


def roi_align_rotated_forward(
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio
):
    """Pools rotated rois from a feature map.

    Args:
        input: (N, C, H, W) features.
        rois: (R, 6) rows (batch_index, cx, cy, w, h, angle_degrees) in image coordinates.
        spatial_scale: feature-map size / image size.
        pooled_height, pooled_width: output bins per roi.
        sampling_ratio: samples per bin and axis; <= 0 picks ceil(roi_size / pooled_size).
    Returns:
        (R, C, pooled_height, pooled_width), same dtype as input. Built from differentiable
        ops, so it also back-propagates to ``input`` through autograd.
    """
    num, channels, height, width = input.shape
    rois = rois.to(input.dtype)
    spatial_scale = _kernel_scale(spatial_scale)
    out = input.new_zeros((len(rois), pooled_height, pooled_width, channels))
    if out.numel() == 0:
        return out.permute(0, 3, 1, 2)
    # (N * H * W, C): one row per feature-map pixel, so a gather picks whole channel vectors.
    table = input.permute(0, 2, 3, 1).reshape(num * height * width, channels)
    pieces = []
    for ids, gh, gw in _groups(
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels
    ):
        sub = rois[ids]
        index, weights = _sample_plan(
            sub, spatial_scale, pooled_height, pooled_width, gh, gw, height, width
        )
        base = sub[:, 0].long() * (height * width)
        index = index + base[:, None, None, None, None, None]
        values = table[index.reshape(-1)].reshape(*index.shape, channels)
        pooled = (values * weights[..., None]).sum(dim=(2, 4, 5)) / (gh * gw)
        pieces.append((ids, pooled))
    if pieces:
        ids = torch.cat([p[0] for p in pieces])
        out = out.index_put((ids,), torch.cat([p[1] for p in pieces]))
    return out.permute(0, 3, 1, 2).contiguous()


def roi_align_rotated_backward(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
):
    """Gradient of :func:`roi_align_rotated_forward` with respect to its input.

    Args:
        grad: (R, C, pooled_height, pooled_width) gradient of the pooled output.
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio: as in the forward.
        batch_size, channels, height, width: shape of the forward input.
    Returns:
        (batch_size, channels, height, width) gradient, same dtype as grad.
    """
    rois = rois.to(grad.dtype)
    spatial_scale = _kernel_scale(spatial_scale)
    flat = grad.new_zeros((batch_size * height * width, channels))
    if grad.numel() == 0:
        return flat.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()
    grad_bins = grad.permute(0, 2, 3, 1)  # (R, PH, PW, C)
    for ids, gh, gw in _groups(
        rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, channels
    ):
        sub = rois[ids]
        index, weights = _sample_plan(
            sub, spatial_scale, pooled_height, pooled_width, gh, gw, height, width
        )
        base = sub[:, 0].long() * (height * width)
        index = index + base[:, None, None, None, None, None]
        # Every tap of a sample in bin (ph, pw) receives grad[ph, pw] * weight / count.
        g = grad_bins[ids][:, :, None, :, None, None, :] / (gh * gw)
        contrib = g * weights[..., None]
        flat.index_add_(0, index.reshape(-1), contrib.reshape(-1, channels))
    return flat.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()
