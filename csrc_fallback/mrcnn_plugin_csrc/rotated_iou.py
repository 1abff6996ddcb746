"""IoU and NMS for rotated boxes, written with batched torch ops (any device).

A rotated box is ``(x_center, y_center, width, height, angle_degrees)``. Its corners follow
detectron2's convention: a point ``(u, v)`` in box-local coordinates goes to
``(cx + u*cos + v*sin, cy - u*sin + v*cos)`` in image coordinates (y pointing down), i.e. the
box is turned counter-clockwise on screen by a positive angle.

The intersection of two boxes is the polygon left after clipping one box by the four edge
half-planes of the other (Sutherland-Hodgman); both are convex, so that is exact. Pairs whose
circumscribed circles do not touch are skipped, which keeps NMS on many boxes cheap.
"""

import numpy as np
import torch

# Pairs clipped together in one batch, and (N x M) grid cells screened together; both only
# bound peak memory.
_PAIRS_PER_BATCH = 1 << 16
_CELLS_PER_CHUNK = 1 << 22
# detectron2 treats boxes with an area below this as empty (IoU 0).
_MIN_AREA = 1e-14


def _ccw_corners(boxes):
    """(P, 5) float64 boxes -> (P, 4, 2) corners in counter-clockwise (math) order."""
    theta = torch.deg2rad(boxes[:, 4])
    cos, sin = torch.cos(theta), torch.sin(theta)
    half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
    # Local corners listed counter-clockwise; the rotation below has determinant +1, so the
    # order stays counter-clockwise.
    u = torch.stack([half_w, -half_w, -half_w, half_w], dim=1)
    v = torch.stack([half_h, half_h, -half_h, -half_h], dim=1)
    x = boxes[:, None, 0] + u * cos[:, None] + v * sin[:, None]
    y = boxes[:, None, 1] - u * sin[:, None] + v * cos[:, None]
    return torch.stack([x, y], dim=2)


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def _gather_next(points, count):
    """Next vertex of each slot of a front-packed polygon: (P, K, 2), count (P,) -> (P, K, 2)."""
    k = points.shape[1]
    idx = torch.arange(k, device=points.device) + 1
    idx = torch.where(idx[None, :] < count[:, None], idx[None, :], torch.zeros_like(idx)[None])
    return torch.gather(points, 1, idx[:, :, None].expand(-1, -1, 2))


def _clip_by_edge(points, count, edge_a, edge_b):
    """Keeps the part of each polygon on the left of the directed line edge_a -> edge_b.

    Args:
        points: (P, K, 2) vertices, the first ``count`` of each row valid, in order.
        count: (P,) number of valid vertices.
        edge_a, edge_b: (P, 2) line points.
    Returns:
        (points, count) of the clipped polygons, again packed to the front.
    """
    k = points.shape[1]
    valid = torch.arange(k, device=points.device)[None, :] < count[:, None]
    nxt = _gather_next(points, count)
    ex, ey = (edge_b - edge_a).unbind(-1)
    side = _cross(ex[:, None], ey[:, None], *(points - edge_a[:, None]).unbind(-1))
    side_next = _cross(ex[:, None], ey[:, None], *(nxt - edge_a[:, None]).unbind(-1))
    inside, inside_next = side >= 0, side_next >= 0
    crossing = valid & (inside != inside_next)
    # side and side_next have opposite signs where crossing, so the denominator is non-zero.
    denom = torch.where(crossing, side - side_next, torch.ones_like(side))
    t = (side / denom)[..., None]
    cut = points + t * (nxt - points)
    # Each input vertex emits itself (if inside) and then the crossing point (if any).
    candidates = torch.stack([points, cut], dim=2).reshape(points.shape[0], 2 * k, 2)
    keep = torch.stack([valid & inside, crossing], dim=2).reshape(points.shape[0], 2 * k)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    new_count = keep.sum(dim=1)
    width = max(int(new_count.max()), 1) if new_count.numel() else 1
    order = order[:, :width]
    packed = torch.gather(candidates, 1, order[:, :, None].expand(-1, -1, 2))
    return packed, new_count


def _polygon_area(points, count):
    """Shoelace area of front-packed polygons: (P, K, 2), (P,) -> (P,)."""
    k = points.shape[1]
    valid = torch.arange(k, device=points.device)[None, :] < count[:, None]
    nxt = _gather_next(points, count)
    twice = _cross(*points.unbind(-1), *nxt.unbind(-1))
    return (twice * valid).sum(dim=1).abs() / 2


def _paired_iou(boxes1, boxes2):
    """IoU of matching rows: (P, 5), (P, 5) float64 -> (P,) float64."""
    # Work relative to the pair's midpoint: far-from-origin boxes lose no precision.
    shift = (boxes1[:, :2] + boxes2[:, :2]) / 2
    b1 = torch.cat([boxes1[:, :2] - shift, boxes1[:, 2:]], dim=1)
    b2 = torch.cat([boxes2[:, :2] - shift, boxes2[:, 2:]], dim=1)
    poly = _ccw_corners(b1)
    count = torch.full((poly.shape[0],), 4, dtype=torch.long, device=poly.device)
    clipper = _ccw_corners(b2)
    for e in range(4):
        poly, count = _clip_by_edge(poly, count, clipper[:, e], clipper[:, (e + 1) % 4])
    inter = _polygon_area(poly, count)
    area1 = b1[:, 2] * b1[:, 3]
    area2 = b2[:, 2] * b2[:, 3]
    union = area1 + area2 - inter
    empty = (area1 < _MIN_AREA) | (area2 < _MIN_AREA)
    return torch.where(empty, torch.zeros_like(inter), inter / torch.where(empty, 1.0, union))


def _overlapping_pairs(boxes1, boxes2, upper_only=False):
    """Yields (i, j, iou) for pairs whose circumscribed circles intersect, in row chunks.

    ``upper_only`` restricts to j > i (for NMS over one set). Pairs left out have IoU 0.
    """
    b1 = boxes1.to(torch.float64)
    b2 = boxes2.to(torch.float64)
    radius1 = torch.hypot(b1[:, 2], b1[:, 3]) / 2
    radius2 = torch.hypot(b2[:, 2], b2[:, 3]) / 2
    rows = max(1, _CELLS_PER_CHUNK // max(len(b2), 1))
    for start in range(0, len(b1), rows):
        stop = min(start + rows, len(b1))
        dist = torch.cdist(b1[start:stop, :2], b2[:, :2])
        near = dist <= radius1[start:stop, None] + radius2[None, :]
        if upper_only:
            cols = torch.arange(len(b2), device=b2.device)
            near &= cols[None, :] > torch.arange(start, stop, device=b2.device)[:, None]
        ii, jj = near.nonzero(as_tuple=True)
        ii = ii + start
        for p in range(0, len(ii), _PAIRS_PER_BATCH):
            i, j = ii[p : p + _PAIRS_PER_BATCH], jj[p : p + _PAIRS_PER_BATCH]
            yield i, j, _paired_iou(b1[i], b2[j])


def box_iou_rotated(boxes1, boxes2):
    """Pairwise IoU of rotated boxes.

    Args:
        boxes1: (N, 5) and boxes2: (M, 5) tensors (cx, cy, w, h, angle in degrees).
    Returns:
        (N, M) IoU, float32 (float64 for float64 inputs), on the boxes' device.
    """
    assert boxes1.device == boxes2.device, "boxes must be on the same device"
    out_dtype = torch.promote_types(boxes1.dtype, torch.float32)
    ious = torch.zeros((len(boxes1), len(boxes2)), dtype=torch.float64, device=boxes1.device)
    for i, j, iou in _overlapping_pairs(boxes1, boxes2):
        ious[i, j] = iou
    return ious.to(out_dtype)


def nms_rotated(dets, scores, iou_threshold):
    """Greedy NMS for rotated boxes, as detectron2's CPU kernel does it.

    A box is dropped if its IoU with an already kept, higher-scored box is >= iou_threshold.

    Args:
        dets: (N, 5) rotated boxes; scores: (N,); iou_threshold: float.
    Returns:
        int64 (K,) indices of the kept boxes, by decreasing score, on dets' device.
    """
    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = dets[order]
    firsts, seconds = [], []
    for i, j, iou in _overlapping_pairs(ranked, ranked, upper_only=True):
        hit = iou >= iou_threshold
        firsts.append(i[hit])
        seconds.append(j[hit])
    return order[_greedy_keep(len(ranked), firsts, seconds).to(order.device)]


def _greedy_keep(n, firsts, seconds):
    """Greedy pass over ranks 0..n-1 given "rank i suppresses rank j" pairs (i < j)."""
    if firsts:
        src = torch.cat(firsts).cpu().numpy()
        dst = torch.cat(seconds).cpu().numpy()
    else:
        src = dst = np.zeros(0, dtype=np.int64)
    by_src = np.argsort(src, kind="stable")
    src, dst = src[by_src], dst[by_src]
    bounds = np.searchsorted(src, np.arange(n + 1))
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed[dst[bounds[i] : bounds[i + 1]]] = True
    return torch.as_tensor(keep, dtype=torch.long)
