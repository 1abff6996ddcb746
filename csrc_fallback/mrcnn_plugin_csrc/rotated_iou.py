"""``box_iou_rotated`` and ``nms_rotated`` of detectron2's ``_C``, on any device.

Each pair's IoU is computed by :func:`rotated_pair_iou.paired_iou`, which follows the compiled
kernel step by step. Pairs that cannot touch are skipped (IoU 0, as the kernel finds for
them): a pair is only computed when the circumscribed circles, widened by the kernel's
tolerances, intersect. That keeps NMS over thousands of boxes cheap.
"""

import numpy as np
import torch

from .rotated_pair_iou import MIN_AREA, paired_iou

# Pairs computed together in one batch, and (N x M) grid cells screened together; both only
# bound peak memory.
_PAIRS_PER_BATCH = 1 << 14
_CELLS_PER_CHUNK = 1 << 22


def _reach(boxes):
    """Distance from a box's centre beyond which the kernel finds nothing of it: (N,) float64.

    The circumscribed radius, plus the slack the kernel's 1e-5 tolerances allow: relative to
    the edge lengths for edge crossings, 1e-5 / side for its corner-in-box projections.
    """
    b = boxes.double()
    side = torch.minimum(b[:, 2], b[:, 3]).abs().clamp(min=1e-30)
    radius = torch.hypot(b[:, 2], b[:, 3]) / 2
    reach = radius * (1 + 1e-4) + 4e-5 / side + 1e-6
    # Boxes of (almost) no area have IoU 0 with everything: never computed.
    empty = (boxes[:, 2] * boxes[:, 3]).double() < MIN_AREA
    return torch.where(empty, torch.full_like(reach, -float("inf")), reach)


def _pairs(boxes1, boxes2, upper_only=False, screen=True):
    """Yields (i, j, iou) for the pairs that may overlap, in batches.

    ``upper_only`` restricts to j > i (NMS over one set). Pairs left out have IoU 0.
    """
    reach1, reach2 = _reach(boxes1), _reach(boxes2)
    xy1, xy2 = boxes1[:, :2].double(), boxes2[:, :2].double()
    rows = max(1, _CELLS_PER_CHUNK // max(len(boxes2), 1))
    for start in range(0, len(boxes1), rows):
        stop = min(start + rows, len(boxes1))
        if screen:
            near = torch.cdist(xy1[start:stop], xy2) <= reach1[start:stop, None] + reach2
        else:
            near = torch.ones((stop - start, len(boxes2)), dtype=torch.bool, device=xy1.device)
        if upper_only:
            cols = torch.arange(len(boxes2), device=xy1.device)
            near &= cols[None, :] > torch.arange(start, stop, device=xy1.device)[:, None]
        ii, jj = near.nonzero(as_tuple=True)
        ii = ii + start
        for p in range(0, len(ii), _PAIRS_PER_BATCH):
            i, j = ii[p : p + _PAIRS_PER_BATCH], jj[p : p + _PAIRS_PER_BATCH]
            yield i, j, paired_iou(boxes1[i], boxes2[j])


def _kernel_dtype(tensor):
    """The kernels dispatch on float32 and float64; lower precisions are computed in float32."""
    return tensor.dtype if tensor.dtype == torch.float64 else torch.float32


def box_iou_rotated(boxes1, boxes2):
    """Pairwise IoU of rotated boxes, computed and returned in float32 as the compiled op does.

    Args:
        boxes1: (N, 5) and boxes2: (M, 5) tensors (cx, cy, w, h, angle in degrees).
    Returns:
        (N, M) float32 IoU on the boxes' device. The compiled op accepts float32 only; other
        floating dtypes are rounded to float32 first.
    """
    if boxes1.device != boxes2.device:
        raise RuntimeError("box_iou_rotated: boxes1 and boxes2 must be on the same device")
    boxes1 = boxes1.detach().to(torch.float32).contiguous()
    boxes2 = boxes2.detach().to(torch.float32).contiguous()
    ious = torch.zeros((len(boxes1), len(boxes2)), dtype=torch.float32, device=boxes1.device)
    for i, j, iou in _pairs(boxes1, boxes2):
        ious[i, j] = iou
    return ious


def nms_rotated(dets, scores, iou_threshold):
    """Greedy NMS for rotated boxes, as detectron2's CPU kernel does it.

    Boxes are visited by decreasing score in the order ``scores.sort(descending=True)`` gives
    (the kernel's call, so ties break the same way). A box is dropped if its IoU, computed in
    the boxes' dtype, with an already kept box is >= iou_threshold.

    Args:
        dets: (N, 5) rotated boxes; scores: (N,); iou_threshold: float.
    Returns:
        int64 (K,) indices of the kept boxes, by decreasing score, on dets' device.
    """
    if dets.dtype != scores.dtype:
        raise RuntimeError("nms_rotated: dets should have the same type as scores")
    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    dets = dets.detach().to(_kernel_dtype(dets)).contiguous()
    order = scores.detach().contiguous().sort(0, descending=True).indices
    ranked = dets[order]
    firsts, seconds = [], []
    # With a threshold <= 0 even disjoint boxes (IoU 0) suppress each other: no screening.
    pairs = _pairs(ranked, ranked, upper_only=True, screen=iou_threshold > 0)
    for i, j, iou in pairs:
        hit = iou.double() >= iou_threshold
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
