"""IoU of matching rows of two rotated-box tensors, step for step as detectron2's CPU kernel.

detectron2 decides anchor matches, NMS and RRPN losses by comparing these IoUs, so ties and
near-ties must come out as the compiled kernel makes them. The computation therefore keeps its
dtype (float32 for ``box_iou_rotated``), its operation order, its epsilons (compared in
float64, as C++ promotes them), the order in which intersection candidates are collected, its
convex-hull sort (the same compare-and-swap sequence) and its sequential area sum. Every step
is vectorized over pairs; loops run over the at most 24 candidate slots.

A box is ``(x_center, y_center, width, height, angle_degrees)``; a positive angle turns it
counter-clockwise on screen (image y points down).
"""

import torch

# Tolerances of the compiled kernel.
_EPS = 1e-5  # candidate tests: edge parameters and projections
_PARALLEL = 1e-14  # |det| at or below this: parallel edges
_SORT_EPS = 1e-6  # cross products this close to 0: collinear in the hull sort
_SAME_POINT = 1e-8  # squared distance below which hull points coincide
MIN_AREA = 1e-14  # a box with a smaller area has IoU 0 with everything
_DEG_TO_RAD = 0.01745329251  # the kernel's own constant, not math.pi / 180


def _corners(cx, cy, w, h, angle):
    """(P,) box fields -> x, y of the 4 corners, (P, 4) each, in the kernel's order."""
    theta = angle.double() * _DEG_TO_RAD  # the kernel takes cos/sin in double, then rounds
    cos = torch.cos(theta).to(cx.dtype) * 0.5
    sin = torch.sin(theta).to(cx.dtype) * 0.5
    x0 = cx + sin * h + cos * w
    y0 = cy + cos * h - sin * w
    x1 = cx - sin * h + cos * w
    y1 = cy - cos * h - sin * w
    x2, y2 = 2 * cx - x0, 2 * cy - y0
    x3, y3 = 2 * cx - x1, 2 * cy - y1
    return torch.stack([x0, x1, x2, x3], dim=1), torch.stack([y0, y1, y2, y3], dim=1)


def _inside(px, py, qx, qy):
    """Mask (P, 4): corners p of one box within box q (the kernel's relaxed projection test)."""
    abx, aby = qx[:, 1] - qx[:, 0], qy[:, 1] - qy[:, 0]
    dax, day = qx[:, 0] - qx[:, 3], qy[:, 0] - qy[:, 3]
    ab_ab = (abx * abx + aby * aby).double()[:, None]
    ad_ad = (dax * dax + day * day).double()[:, None]
    apx, apy = px - qx[:, :1], py - qy[:, :1]
    ap_ab = (apx * abx[:, None] + apy * aby[:, None]).double()
    ap_ad = -(apx * dax[:, None] + apy * day[:, None]).double()
    return (ap_ab > -_EPS) & (ap_ad > -_EPS) & (ap_ab < ab_ab + _EPS) & (ap_ad < ad_ad + _EPS)


def _candidates(x1, y1, x2, y2):
    """Intersection-polygon candidates, packed to the front in the kernel's order.

    Order: edge crossings (box-1 edge major, box-2 edge minor), box-1 corners inside box 2,
    box-2 corners inside box 1. Returns x, y (P, 24) and the count (P,).
    """
    vx1, vy1 = x1.roll(-1, 1) - x1, y1.roll(-1, 1) - y1  # edge i: corner i -> corner i+1
    vx2, vy2 = x2.roll(-1, 1) - x2, y2.roll(-1, 1) - y2
    # Axis 1: edge i of box 1, axis 2: edge j of box 2.
    ax, ay, avx, avy = x1[:, :, None], y1[:, :, None], vx1[:, :, None], vy1[:, :, None]
    bvx, bvy = vx2[:, None, :], vy2[:, None, :]
    det = bvx * avy - avx * bvy
    crossing = det.double().abs() > _PARALLEL
    det = torch.where(crossing, det, torch.ones_like(det))
    dx, dy = x2[:, None, :] - ax, y2[:, None, :] - ay
    t1 = (bvx * dy - dx * bvy) / det
    t2 = (avx * dy - dx * avy) / det
    for t in (t1.double(), t2.double()):
        crossing &= (t > -_EPS) & (t < 1.0 + _EPS)
    px = torch.cat([(ax + avx * t1).flatten(1), x1, x2], dim=1)
    py = torch.cat([(ay + avy * t1).flatten(1), y1, y2], dim=1)
    keep = torch.cat([crossing.flatten(1), _inside(x1, y1, x2, y2), _inside(x2, y2, x1, y1)], 1)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    return px.gather(1, order), py.gather(1, order), keep.sum(dim=1)


def _take(values, index):
    """values (P, K) at per-row index (P,) -> (P,)."""
    return values.gather(1, index[:, None])[:, 0]


def _put(values, index, new, where):
    """Writes new (P,) at per-row index (P,) in rows where ``where``; returns the result."""
    old = _take(values, index)
    return values.scatter(1, index[:, None], torch.where(where, new, old)[:, None])


def _hull_area(px, py, count):
    """Area of the convex hull of the first ``count`` points of each row (Graham scan).

    Args:
        px, py: (P, K) candidate points, count (P,) of them valid, count >= 3.
    """
    num, width = px.shape
    slots = torch.arange(width, device=px.device)[None, :]
    valid = slots < count[:, None]
    # Start: lowest y, then lowest x, first such point.
    big = torch.full_like(px, float("inf"))
    low_y = torch.where(valid, py, big).min(dim=1, keepdim=True).values
    on_low = valid & (py == low_y)
    low_x = torch.where(on_low, px, big).min(dim=1, keepdim=True).values
    start = (on_low & (px == low_x)).to(torch.uint8).argmax(dim=1)
    qx = px - _take(px, start)[:, None]
    qy = py - _take(py, start)[:, None]
    rows = torch.arange(num, device=px.device)
    for q in (qx, qy):  # swap the start point into slot 0
        first = q[:, 0].clone()
        q[:, 0] = q[rows, start]
        q[rows, start] = first
    dist = qx * qx + qy * qy
    # Angular sort by the kernel's compare-and-swap passes (not a strict weak order, so only
    # the same sequence of swaps gives the same result).
    for i in range(1, width - 1):
        for j in range(i + 1, width):
            cross = qx[:, i] * qy[:, j] - qx[:, j] * qy[:, i]
            c = cross.double()
            swap = (j < count) & (
                (c < -_SORT_EPS) | ((c.abs() < _SORT_EPS) & (dist[:, i] > dist[:, j]))
            )
            if bool(swap.any()):
                for t in (qx, qy, dist):
                    a, b = t[:, i].clone(), t[:, j]
                    t[:, i] = torch.where(swap, b, a)
                    t[:, j] = torch.where(swap, a, b)
    dist = qx * qx + qy * qy
    # Second hull point: the first one that does not coincide with the start.
    apart = valid & (slots >= 1) & (dist.double() > _SAME_POINT)
    has_second = apart.any(dim=1)
    second = torch.where(has_second, apart.to(torch.uint8).argmax(dim=1), 1)
    qx[:, 1] = torch.where(has_second, _take(qx, second), qx[:, 1])
    qy[:, 1] = torch.where(has_second, _take(qy, second), qy[:, 1])
    top = torch.full((num,), 2, dtype=torch.long, device=px.device)  # stack size m
    for i in range(2, width):
        active = has_second & (i > second) & (i < count)
        if not bool(active.any()):
            continue
        xi, yi = qx[:, i], qy[:, i]
        while True:  # pop while the last two stack points and point i do not turn left
            below = (top - 2).clamp(min=0)
            last = (top - 1).clamp(min=0)
            bx, by = _take(qx, below), _take(qy, below)
            x1, y1 = xi - bx, yi - by
            x2, y2 = _take(qx, last) - bx, _take(qy, last) - by
            pop = active & (top > 1) & (x1 * y2 >= x2 * y1)
            if not bool(pop.any()):
                break
            top = top - pop.long()
        slot = top.clamp(max=width - 1)
        qx = _put(qx, slot, xi, active)
        qy = _put(qy, slot, yi, active)
        top = top + active.long()
    top = torch.where(has_second, top, 1)
    # Fan triangulation from point 0, summed in order like the kernel.
    area = torch.zeros_like(px[:, 0])
    for i in range(1, width - 1):
        fan = i < top - 1
        if not bool(fan.any()):
            break
        ux, uy = qx[:, i] - qx[:, 0], qy[:, i] - qy[:, 0]
        vx, vy = qx[:, i + 1] - qx[:, 0], qy[:, i + 1] - qy[:, 0]
        area = torch.where(fan, area + (ux * vy - vx * uy).abs(), area)
    return area / 2


def paired_iou(boxes1, boxes2):
    """IoU of boxes1[p] with boxes2[p]: (P, 5), (P, 5) of one floating dtype -> (P,), same dtype.

    The dtype is the kernel's ``T``: detectron2 calls it with float32 for box_iou_rotated and
    with the boxes' own dtype in nms_rotated.
    """
    dtype = boxes1.dtype
    # Shift both boxes so the pair's midpoint is the origin (the kernel does this in double).
    shift = (boxes1[:, :2] + boxes2[:, :2]).double() / 2.0
    c1 = (boxes1[:, :2].double() - shift).to(dtype)
    c2 = (boxes2[:, :2].double() - shift).to(dtype)
    area1 = boxes1[:, 2] * boxes1[:, 3]
    area2 = boxes2[:, 2] * boxes2[:, 3]
    iou = torch.zeros_like(area1)
    solid = (area1.double() >= MIN_AREA) & (area2.double() >= MIN_AREA)
    x1, y1 = _corners(c1[:, 0], c1[:, 1], boxes1[:, 2], boxes1[:, 3], boxes1[:, 4])
    x2, y2 = _corners(c2[:, 0], c2[:, 1], boxes2[:, 2], boxes2[:, 3], boxes2[:, 4])
    px, py, count = _candidates(x1, y1, x2, y2)
    # Two candidates or fewer: no area (the kernel returns 0 before building a hull).
    polygon = (solid & (count > 2)).nonzero(as_tuple=True)[0]
    if len(polygon):
        width = int(count[polygon].max())
        inter = _hull_area(px[polygon, :width], py[polygon, :width], count[polygon])
        union = area1[polygon] + area2[polygon] - inter
        iou[polygon] = inter / union
    return iou
