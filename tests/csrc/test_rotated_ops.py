"""Rotated-box ops of the detectron2._C stand-in: IoU, NMS, ROIAlignRotated.

References are written here independently of the implementation: IoU by the
"corners inside + edge crossings, convex hull, shoelace" construction in plain Python floats,
NMS by a textbook greedy loop, ROIAlignRotated by torchvision's roi_align (angle 0) and by the
closed form for linear feature maps (any angle). Everything goes through what the installed
detectron2 calls (its public layers, or the torch.ops / _C entry point it uses), so the same
tests also run against a compiled build.
"""

import math

import pytest
import torch
from detectron2 import _C
from detectron2.layers import ROIAlignRotated, batched_nms_rotated, nms_rotated
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
from torchvision.ops import box_iou, roi_align

STAND_IN = getattr(_C, "IS_PURE_PYTORCH_STANDIN", False)


def _entry_point(name):
    """torch.ops.detectron2.<name> (main, and the stand-in), else _C.<name> (compiled v0.6)."""
    try:
        return getattr(torch.ops.detectron2, name)
    except (AttributeError, RuntimeError):
        return getattr(_C, name)


def _corners(box):
    """detectron2's convention (see its Visualizer): local (u, v) -> (c*u + s*v, -s*u + c*v)."""
    cx, cy, w, h, angle = (float(v) for v in box)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    local = [(w / 2, h / 2), (-w / 2, h / 2), (-w / 2, -h / 2), (w / 2, -h / 2)]
    return [(cx + c * u + s * v, cy - s * u + c * v) for u, v in local]


def _inside(p, poly, eps=1e-9):
    signs = []
    for k in range(4):
        (ax, ay), (bx, by) = poly[k], poly[(k + 1) % 4]
        signs.append((bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax))
    return all(z >= -eps for z in signs) or all(z <= eps for z in signs)


def _segment_hits(p1, p2, q1, q2):
    d1 = (p2[0] - p1[0], p2[1] - p1[1])
    d2 = (q2[0] - q1[0], q2[1] - q1[1])
    den = d1[0] * d2[1] - d1[1] * d2[0]
    if abs(den) < 1e-12:
        return []
    t = ((q1[0] - p1[0]) * d2[1] - (q1[1] - p1[1]) * d2[0]) / den
    u = ((q1[0] - p1[0]) * d1[1] - (q1[1] - p1[1]) * d1[0]) / den
    if 0 <= t <= 1 and 0 <= u <= 1:
        return [(p1[0] + t * d1[0], p1[1] + t * d1[1])]
    return []


def reference_iou(box1, box2):
    """Intersection = convex hull of mutual inside corners and edge crossings (float64)."""
    a, b = _corners(box1), _corners(box2)
    area1, area2 = float(box1[2]) * float(box1[3]), float(box2[2]) * float(box2[3])
    if area1 <= 0 or area2 <= 0:
        return 0.0
    pts = [p for p in a if _inside(p, b)] + [p for p in b if _inside(p, a)]
    for i in range(4):
        for j in range(4):
            pts += _segment_hits(a[i], a[(i + 1) % 4], b[j], b[(j + 1) % 4])
    if len(pts) < 3:
        return 0.0
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    pts.sort(key=lambda p: math.atan2(p[1] - my, p[0] - mx))
    inter = 0.5 * abs(
        sum(
            pts[k][0] * pts[(k + 1) % len(pts)][1] - pts[(k + 1) % len(pts)][0] * pts[k][1]
            for k in range(len(pts))
        )
    )
    return inter / (area1 + area2 - inter)


def _random_boxes(n, gen, spread=30.0, offset=0.0):
    centers = torch.rand(n, 2, generator=gen, dtype=torch.float64) * spread + offset
    sizes = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 20 + 2
    angles = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 360 - 180
    return torch.cat([centers, sizes, angles], dim=1)


@pytest.mark.skipif(not STAND_IN, reason="a compiled detectron2._C is loaded instead")
def test_stand_in_is_in_use():
    assert getattr(_C, "IS_PURE_PYTORCH_STANDIN", False), "expected the pure-PyTorch _C"


@pytest.mark.skipif(not STAND_IN, reason="a compiled detectron2._C is loaded instead")
def test_stand_in_registers_the_torch_ops_main_calls():
    gen = torch.Generator().manual_seed(9)
    boxes = _random_boxes(6, gen).float()
    ops = torch.ops.detectron2
    assert torch.equal(ops.box_iou_rotated(boxes, boxes), _C.box_iou_rotated(boxes, boxes))
    assert torch.equal(
        ops.nms_rotated(boxes, boxes[:, 0], 0.5), _C.nms_rotated(boxes, boxes[:, 0], 0.5)
    )
    x = torch.randn(1, 2, 5, 6, generator=gen)
    rois = torch.cat([torch.zeros(6, 1), boxes], dim=1)
    out = ops.roi_align_rotated_forward(x, rois, 0.5, 3, 2, 0)
    torch.testing.assert_close(out, _C.roi_align_rotated_forward(x, rois, 0.5, 3, 2, 0))
    back = ops.roi_align_rotated_backward(out, rois, 0.5, 3, 2, 1, 2, 5, 6, 0)
    torch.testing.assert_close(
        back, _C.roi_align_rotated_backward(out, rois, 0.5, 3, 2, 1, 2, 5, 6, 0)
    )


def test_registration_is_guarded():
    # Defining an operator twice raises in torch.library: a clean second call proves the guard.
    torch_ops = pytest.importorskip("mrcnn_plugin_csrc.torch_ops")
    existing = {n for n in torch_ops.OPERATORS if torch_ops.is_registered(n)}
    assert "nms_rotated" in existing  # registered by whichever detectron2._C loaded
    added = torch_ops.register_operators()  # only ops nobody registered (none on main)
    assert existing.isdisjoint(added) and existing | set(added) == set(torch_ops.OPERATORS)
    assert torch_ops.register_operators() == []


@pytest.mark.parametrize("offset", [0.0, 5000.0])
def test_box_iou_rotated_matches_polygon_reference(offset):
    gen = torch.Generator().manual_seed(0)
    # Rounded to float32 first, so the reference sees exactly the values the op gets.
    boxes1 = _random_boxes(14, gen, offset=offset).float()
    boxes2 = torch.cat([_random_boxes(10, gen, offset=offset).float(), boxes1[:3]])
    boxes2[3, 4] = boxes2[3, 4] + 180  # same region, angle differs by 180 degrees
    got = pairwise_iou_rotated(boxes1, boxes2)
    want = torch.tensor([[reference_iou(p, q) for q in boxes2] for p in boxes1])
    assert got.shape == (14, 13) and got.dtype == torch.float32
    assert (want > 0.05).sum() >= 10, "test data should contain real overlaps"
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.diagonal(got[:3, 10:]), torch.ones(3), atol=1e-5, rtol=0)


def test_box_iou_rotated_axis_aligned_equals_torchvision():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=gen) * 40
    wh = torch.rand(20, 2, generator=gen) * 25 + 1
    corners = torch.cat([xy, xy + wh], dim=1)
    rotated = torch.cat([xy + wh / 2, wh, torch.zeros(20, 1)], dim=1)
    torch.testing.assert_close(
        pairwise_iou_rotated(rotated[:12], rotated[8:]),
        box_iou(corners[:12], corners[8:]),
        atol=1e-5,
        rtol=0,
    )


def test_box_iou_rotated_hand_cases():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0, 0.0],
            [0.0, 0.0, 2.0, 2.0, 45.0],  # octagon overlap with the first
            [0.0, 0.0, 2.0, 4.0, 90.0],  # 4 wide x 2 high after turning: half of the next
            [0.0, 0.0, 4.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 3.0, 0.0],  # empty box
        ]
    )
    iou = pairwise_iou_rotated(boxes, boxes)
    inter = 4 - 2 * (2 - math.sqrt(2)) ** 2  # square minus four corner triangles
    assert iou[0, 1].item() == pytest.approx(inter / (8 - inter), abs=1e-6)
    assert iou[2, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert iou[0, 3].item() == pytest.approx(0.5, abs=1e-6)
    assert (iou[4] == 0).all() and (iou[:, 4] == 0).all()
    # Direction: +45 degrees tilts the long axis towards (+x, -y) in image coordinates.
    long_box = torch.tensor([[0.0, 0.0, 10.0, 1.0, 45.0]])
    probes = torch.tensor([[3.0, -3.0, 1.0, 1.0, 0.0], [3.0, 3.0, 1.0, 1.0, 0.0]])
    iou = pairwise_iou_rotated(long_box, probes)[0]
    assert iou[0] > 0.05 and iou[1] == 0


def _greedy_nms(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(reference_iou(boxes[i], boxes[k]) < threshold for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_nms_rotated_matches_greedy_reference(threshold):
    gen = torch.Generator().manual_seed(2)
    boxes = _random_boxes(30, gen, spread=15.0)
    jitter = torch.randn(10, 5, generator=gen, dtype=torch.float64) * 0.3
    boxes = torch.cat([boxes, boxes[:10] + jitter]).float().double()  # near duplicates
    scores = torch.rand(40, generator=gen, dtype=torch.float64)
    want = _greedy_nms(boxes, scores, threshold)
    got = nms_rotated(boxes.float(), scores.float(), threshold)
    assert got.dtype == torch.int64
    assert got.tolist() == want
    assert 1 < len(want) < 40, "threshold should suppress some boxes but not all"
    op = torch.ops.detectron2.nms_rotated(boxes.float(), scores.float(), threshold)
    assert op.tolist() == want


def test_batched_nms_rotated_keeps_classes_apart():
    gen = torch.Generator().manual_seed(3)
    boxes = _random_boxes(30, gen, spread=10.0).float()
    scores = torch.rand(30, generator=gen)
    classes = torch.randint(0, 3, (30,), generator=gen)
    keep = batched_nms_rotated(boxes, scores, classes, 0.4)
    want = []
    for c in range(3):
        idx = (classes == c).nonzero()[:, 0].tolist()
        want += [idx[k] for k in _greedy_nms(boxes[idx].double(), scores[idx], 0.4)]
    want.sort(key=lambda i: -float(scores[i]))
    assert keep.tolist() == want
    empty = torch.zeros((0, 5))
    assert nms_rotated(empty, torch.zeros(0), 0.5).shape == (0,)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_rotated_angle_zero_equals_torchvision(sampling_ratio):
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(2, 3, 12, 15, generator=gen)
    x0y0 = torch.rand(9, 2, generator=gen) * 24 - 3  # some rois stick out of the image
    wh = torch.rand(9, 2, generator=gen) * 14 + 0.5
    batch = torch.randint(0, 2, (9, 1), generator=gen).float()
    boxes = torch.cat([batch, x0y0, x0y0 + wh], dim=1)
    rotated = torch.cat([batch, x0y0 + wh / 2, wh, torch.zeros(9, 1)], dim=1)
    pooler = ROIAlignRotated((4, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio)
    want = roi_align(features, boxes, (4, 3), 0.5, sampling_ratio, aligned=True)
    torch.testing.assert_close(pooler(features, rotated), want, atol=1e-5, rtol=1e-5)


def test_roi_align_rotated_linear_map_any_angle():
    # On f(i, j) = a*j + b*i + c, bilinear sampling is exact and a bin's sample average is f at
    # the bin centre, so the output is f at the rotated bin centres.
    a, b, c = 0.7, -1.3, 2.0
    grid = torch.arange(40, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    features = (a * cols + b * rows + c)[None, None]
    cx, cy, w, h, angle, scale = 40.0, 38.0, 20.0, 12.0, 30.0, 0.5
    rois = torch.tensor([[0, cx, cy, w, h, angle]], dtype=torch.float64)
    out = ROIAlignRotated((3, 5), spatial_scale=scale, sampling_ratio=2)(features, rois)[0, 0]
    th = math.radians(angle)
    for ph in range(3):
        for pw in range(5):
            yy = (-h / 2 + (ph + 0.5) * h / 3) * scale
            xx = (-w / 2 + (pw + 0.5) * w / 5) * scale
            y = yy * math.cos(th) - xx * math.sin(th) + cy * scale - 0.5
            x = yy * math.sin(th) + xx * math.cos(th) + cx * scale - 0.5
            assert out[ph, pw].item() == pytest.approx(a * x + b * y + c, abs=1e-9)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_rotated_gradcheck(sampling_ratio):
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 3.0, 3.0, 4.0, 3.0, 30.0], [1, 4.0, 2.5, 5.0, 2.0, -60.0], [1, 6.5, 5.5, 3.0, 3.0, 0]],
        dtype=torch.float64,
    )
    pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=sampling_ratio)
    assert torch.autograd.gradcheck(lambda x: pooler(x, rois), (features,))
    # The explicit backward is the adjoint of the (linear) forward: <g, F(x)> == <B(g), x>.
    forward = _entry_point("roi_align_rotated_forward")
    backward = _entry_point("roi_align_rotated_backward")
    x = features.detach()
    out = forward(x, rois, 1.0, 2, 2, sampling_ratio)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    back = backward(grad, rois, 1.0, 2, 2, 2, 2, 6, 7, sampling_ratio)
    assert back.shape == x.shape and back.abs().sum() > 0
    assert (grad * out).sum().item() == pytest.approx((back * x).sum().item(), rel=1e-12)
