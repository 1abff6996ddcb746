"""Rotated-box IoU and NMS decide ties exactly as detectron2's compiled CPU kernel.

detectron2's anchor matching, NMS and RRPN/RROI losses compare IoUs for equality and against
thresholds, so float32 rounding decides results. The reference here is a scalar, one-pair-
at-a-time transcription of the kernel's algorithm in numpy float32 (float64 where C++ promotes
to double). It is checked against the installed op (the stand-in, or a compiled build) and
against the stand-in's functions directly; where a compiled detectron2._C is loaded, against
that kernel as well, so the reference itself is verified.
"""

import math

import numpy as np
import pytest
import torch
from detectron2 import _C
from detectron2.layers import nms_rotated
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
from detectron2.structures import RotatedBoxes
from detectron2.structures import pairwise_iou_rotated as structures_pairwise_iou

F = np.float32  # every value and operation below is float32 unless it goes through float()
STAND_IN = getattr(_C, "IS_PURE_PYTORCH_STANDIN", False)


def _corners(cx, cy, w, h, angle):
    theta = float(angle) * 0.01745329251
    c, s = F(math.cos(theta)) * F(0.5), F(math.sin(theta)) * F(0.5)
    p0 = (cx + s * h + c * w, cy + c * h - s * w)
    p1 = (cx - s * h + c * w, cy - c * h - s * w)
    return [p0, p1, (F(2) * cx - p0[0], F(2) * cy - p0[1]), (F(2) * cx - p1[0], F(2) * cy - p1[1])]


def _cross(a, b):
    return a[0] * b[1] - b[0] * a[1]


def _sub(a, b):
    return (a[0] - b[0], a[1] - b[1])


def _points(pts1, pts2):
    """Crossings, then corners of 1 in 2, then corners of 2 in 1; tolerances 1e-5 in double."""
    e1 = [_sub(pts1[(i + 1) % 4], pts1[i]) for i in range(4)]
    e2 = [_sub(pts2[(i + 1) % 4], pts2[i]) for i in range(4)]
    out = []
    for i in range(4):
        for j in range(4):
            det = _cross(e2[j], e1[i])
            if abs(float(det)) <= 1e-14:
                continue
            d = _sub(pts2[j], pts1[i])
            t1, t2 = _cross(e2[j], d) / det, _cross(e1[i], d) / det
            if all(-1e-5 < float(t) < 1.0 + 1e-5 for t in (t1, t2)):
                out.append((pts1[i][0] + e1[i][0] * t1, pts1[i][1] + e1[i][1] * t1))
    for pts, (ab, da, a) in ((pts1, (e2[0], e2[3], pts2[0])), (pts2, (e1[0], e1[3], pts1[0]))):
        ab_ab, ad_ad = float(ab[0] * ab[0] + ab[1] * ab[1]), float(da[0] * da[0] + da[1] * da[1])
        for p in pts:
            ap = _sub(p, a)
            on_ab = float(ap[0] * ab[0] + ap[1] * ab[1])
            on_ad = -float(ap[0] * da[0] + ap[1] * da[1])
            if -1e-5 < on_ab < ab_ab + 1e-5 and -1e-5 < on_ad < ad_ad + 1e-5:
                out.append(p)
    return out


def _hull_area(p):
    n = len(p)
    t = 0
    for i in range(1, n):
        if p[i][1] < p[t][1] or (p[i][1] == p[t][1] and p[i][0] < p[t][0]):
            t = i
    q = [_sub(v, p[t]) for v in p]
    q[0], q[t] = q[t], q[0]
    dist = [v[0] * v[0] + v[1] * v[1] for v in q]
    for i in range(1, n - 1):
        for j in range(i + 1, n):
            c = float(_cross(q[i], q[j]))
            if c < -1e-6 or (abs(c) < 1e-6 and dist[i] > dist[j]):
                q[i], q[j], dist[i], dist[j] = q[j], q[i], dist[j], dist[i]
    k = next((k for k in range(1, n) if float(q[k][0] ** 2 + q[k][1] ** 2) > 1e-8), n)
    if k == n:
        return F(0)
    q[1], m = q[k], 2
    for i in range(k + 1, n):
        while m > 1:
            a, b = _sub(q[i], q[m - 2]), _sub(q[m - 1], q[m - 2])
            if a[0] * b[1] >= b[0] * a[1]:
                m -= 1
            else:
                break
        q[m], m = q[i], m + 1
    area = F(0)
    for i in range(1, m - 1):
        area = area + abs(_cross(_sub(q[i], q[0]), _sub(q[i + 1], q[0])))
    return area / F(2)


def kernel_iou(box1, box2):
    """One pair, float32, in the kernel's order of operations."""
    b1, b2 = [F(v) for v in box1], [F(v) for v in box2]
    shift = [float(b1[k] + b2[k]) / 2.0 for k in (0, 1)]
    c1 = [F(float(b1[k]) - shift[k]) for k in (0, 1)]
    c2 = [F(float(b2[k]) - shift[k]) for k in (0, 1)]
    area1, area2 = b1[2] * b1[3], b2[2] * b2[3]
    if float(area1) < 1e-14 or float(area2) < 1e-14:
        return F(0)
    pts = _points(_corners(*c1, *b1[2:]), _corners(*c2, *b2[2:]))
    if len(pts) <= 2:
        return F(0)
    inter = _hull_area(pts)
    return inter / (area1 + area2 - inter)


def _tricky_boxes():
    """Shared edges, congruent copies, 90/180-degree turns, integer grids and random boxes."""
    gen = torch.Generator().manual_seed(7)
    rows = [
        [5, 5, 4, 2, 0], [5, 5, 2, 4, 90], [5, 5, 4, 2, 180], [5, 5, 4, 2, -180],
        [9, 5, 4, 2, 0], [7, 5, 4, 2, 0], [5, 6, 4, 2, 0], [5, 5, 4, 2, 45],
        [5, 5, 4 * 2**0.5, 2, 30], [1000.25, 2000.5, 3, 3, 10], [1001.25, 2000.5, 3, 3, 10],
        [5, 5, 0, 3, 0], [5, 5, 1e-4, 1e-4, 0], [3, 3, 2, 2, 30.0000001],
    ]  # fmt: skip
    grid = torch.randint(0, 6, (16, 5), generator=gen).float()
    grid[:, 2:4] += 1
    grid[:, 4] = torch.tensor([0.0, 90.0, -90.0, 180.0, 45.0, 30.0, 0.0, 60.0] * 2)
    free = torch.rand(18, 5, generator=gen) * torch.tensor([12, 12, 6, 6, 360]) + torch.tensor(
        [0, 0, 0.5, 0.5, -180]
    )
    return torch.cat([torch.tensor(rows, dtype=torch.float32), grid, free])


@pytest.fixture(scope="module")
def boxes_and_reference():
    boxes = _tricky_boxes()
    want = torch.tensor([[float(kernel_iou(a, b)) for b in boxes.tolist()] for a in boxes.tolist()])
    assert (want > 0).sum() > 200 and ((want > 0) & (want < 1)).sum() > 100
    return boxes, want


def _implementations():
    impls = {"installed op": pairwise_iou_rotated}
    if not STAND_IN:
        stand_in = pytest.importorskip("mrcnn_plugin_csrc.rotated_iou")
        impls["stand-in"] = stand_in.box_iou_rotated
    return impls


def test_box_iou_rotated_equals_kernel_transcription_bit_for_bit(boxes_and_reference):
    boxes, want = boxes_and_reference
    for name, fn in _implementations().items():
        got = fn(boxes, boxes)
        assert got.dtype == torch.float32
        mismatch = (got != want).nonzero().tolist()
        assert not mismatch, f"{name}: {len(mismatch)} pairs differ, e.g. {mismatch[:5]}"
    rotated = structures_pairwise_iou(RotatedBoxes(boxes[:9]), RotatedBoxes(boxes))
    assert torch.equal(rotated, want[:9])


def test_iou_ties_are_exact():
    # Congruent overlaps give bitwise equal IoUs in float32, whatever the float64 values.
    base = torch.tensor([[2.0, 2.0, 2.0, 2.0, 30.0], [4.0, 4.0, 4.0, 4.0, 0.0]])
    anchors = torch.tensor([[2.0, 2.0, 2.0, 2.0, 30.0], [2.0, 2.0, 2.0, 2.0, -150.0]])
    iou = pairwise_iou_rotated(base, anchors)
    assert iou[0, 0] == iou[0, 1] == kernel_iou(base[0].tolist(), anchors[1].tolist())
    assert iou[1, 0] == iou[1, 1]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_rotated_is_greedy_over_kernel_ious(boxes_and_reference, threshold):
    boxes, ious = boxes_and_reference
    gen = torch.Generator().manual_seed(int(threshold * 10))
    scores = torch.randint(0, 5, (len(boxes),), generator=gen).float() / 4  # many ties
    order = scores.sort(0, descending=True).indices.tolist()  # the kernel's own call
    keep = []
    for i in order:
        if all(float(ious[k, i]) < threshold for k in keep):
            keep.append(i)
    impls = [nms_rotated]
    if not STAND_IN:
        impls.append(pytest.importorskip("mrcnn_plugin_csrc.rotated_iou").nms_rotated)
    for fn in impls:
        assert fn(boxes, scores, threshold).tolist() == keep


@pytest.mark.skipif(STAND_IN, reason="no compiled detectron2._C is loaded to compare with")
def test_stand_in_matches_compiled_kernel_on_many_boxes():
    stand_in = pytest.importorskip("mrcnn_plugin_csrc.rotated_iou")
    gen = torch.Generator().manual_seed(11)
    boxes = torch.rand(300, 5, generator=gen) * torch.tensor([60, 60, 20, 20, 360])
    boxes[:, 2:4] += 1
    boxes[::3, :4] = boxes[::3, :4].round()  # integer boxes: exact ties
    boxes[::5, 4] = 0
    torch.testing.assert_close(
        stand_in.box_iou_rotated(boxes, boxes), pairwise_iou_rotated(boxes, boxes), atol=0, rtol=0
    )
    scores = torch.randint(0, 8, (300,), generator=gen).float()
    for threshold in (0.1, 0.5, 0.9):
        want = nms_rotated(boxes, scores, threshold)
        assert stand_in.nms_rotated(boxes, scores, threshold).tolist() == want.tolist()
