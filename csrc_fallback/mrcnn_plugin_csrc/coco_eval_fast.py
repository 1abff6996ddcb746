"""The COCOeval fast path of detectron2's ``_C`` (used by ``fast_eval_api.COCOeval_opt``).

``COCOevalEvaluateImages`` replaces pycocotools' ``COCOeval.evaluateImg`` loop and
``COCOevalAccumulate`` its ``accumulate``, with the same results: greedy matching of
score-sorted detections to ground truth per IoU threshold (crowd ground truth can absorb
several detections, ignored ground truth is only used when no regular one matches), then
101-point interpolated precision over all images per category / area range / maxDets.
Matching is vectorized over IoU thresholds; accumulation over thresholds and recall points.
"""

import time

import numpy as np


class InstanceAnnotation:
    """One ground-truth or detected instance, as the evaluation needs it."""

    __slots__ = ("id", "score", "area", "is_crowd", "ignore")

    def __init__(self, id, score, area, is_crowd, ignore):
        self.id = int(id)
        self.score = float(score)
        self.area = float(area)
        self.is_crowd = bool(is_crowd)
        self.ignore = bool(ignore)

    def __getstate__(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state):
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)


class ImageEvaluation:
    """Matching result of one (image, category, area range), all IoU thresholds at once.

    Attributes:
        detection_matches: (T, D) uint64 id of the matched ground truth, 0 if unmatched.
        detection_scores: (D,) float64 scores, decreasing.
        ground_truth_ignores: (G,) bool, in the order used for matching.
        detection_ignores: (T, D) bool.
    """

    __slots__ = ("detection_matches", "detection_scores", "ground_truth_ignores",
                 "detection_ignores")  # fmt: skip

    def __init__(self):
        self.detection_matches = np.zeros((0, 0), dtype=np.uint64)
        self.detection_scores = np.zeros(0, dtype=np.float64)
        self.ground_truth_ignores = np.zeros(0, dtype=bool)
        self.detection_ignores = np.zeros((0, 0), dtype=bool)

    def __getstate__(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state):
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)


def _match(ious, gt_crowd, gt_ignore, gt_ids, det_ids, thresholds):
    """Greedy matching of score-ordered detections, for all thresholds at once.

    Args:
        ious: (D, G) IoU, rows in score order, columns in ground-truth matching order
            (regular ground truth first, then ignored).
        gt_crowd, gt_ignore: (G,) bool; gt_ids: (G,) uint64; det_ids: (D,) uint64.
        thresholds: (T,) IoU thresholds.
    Returns:
        matches (T, D) uint64 ground-truth ids (0 = none), matched_ignored (T, D) bool.
    """
    num_thr, num_det, num_gt = len(thresholds), ious.shape[0], ious.shape[1]
    matches = np.zeros((num_thr, num_det), dtype=np.uint64)
    matched_ignored = np.zeros((num_thr, num_det), dtype=bool)
    if num_det == 0 or num_gt == 0:
        return matches, matched_ignored
    floor = np.minimum(thresholds, 1 - 1e-10)[:, None]
    gt_taken = np.zeros((num_thr, num_gt), dtype=np.uint64)  # id of the detection holding it
    rows = np.arange(num_thr)
    for d in range(num_det):
        # A regular ground truth already taken is unavailable; crowds can be reused.
        usable = ((gt_taken == 0) | gt_crowd[None, :]) & (ious[d][None, :] >= floor)
        regular = usable & ~gt_ignore[None, :]
        # Regular ground truth wins over ignored ones; among those, highest IoU, last on ties.
        pool = np.where(regular.any(axis=1, keepdims=True), regular, usable & gt_ignore[None, :])
        found = pool.any(axis=1)
        if not found.any():
            continue
        scored = np.where(pool, ious[d][None, :], -np.inf)
        best = num_gt - 1 - np.argmax(scored[:, ::-1], axis=1)
        t = rows[found]
        g = best[found]
        matches[t, d] = gt_ids[g]
        matched_ignored[t, d] = gt_ignore[g]
        gt_taken[t, g] = det_ids[d]
    return matches, matched_ignored


def _evaluate_one(gts, dets, det_order, ious, area_range, thresholds):
    """ImageEvaluation of one image/category/area range (``det_order``: sorted, truncated)."""
    result = ImageEvaluation()
    gt_area = np.array([g.area for g in gts], dtype=np.float64)
    ignore = np.array([g.ignore for g in gts], dtype=bool)
    ignore |= (gt_area < area_range[0]) | (gt_area > area_range[1])
    gt_order = np.argsort(ignore, kind="stable")
    gt_ignore = ignore[gt_order]
    gt_crowd = np.array([gts[i].is_crowd for i in gt_order], dtype=bool)
    gt_ids = np.array([gts[i].id for i in gt_order], dtype=np.uint64)
    det_ids = np.array([dets[i].id for i in det_order], dtype=np.uint64)
    det_area = np.array([dets[i].area for i in det_order], dtype=np.float64)
    if len(det_order) and len(gts):
        # Rows of ``ious`` are already in score order (pycocotools' computeIoU sorts them).
        iou = np.asarray(ious, dtype=np.float64)[: len(det_order)][:, gt_order]
    else:
        iou = np.zeros((len(det_order), len(gts)), dtype=np.float64)
    matches, matched_ignored = _match(iou, gt_crowd, gt_ignore, gt_ids, det_ids, thresholds)
    outside = (det_area < area_range[0]) | (det_area > area_range[1])
    result.detection_matches = matches
    result.detection_ignores = matched_ignored | ((matches == 0) & outside[None, :])
    result.detection_scores = np.array([dets[i].score for i in det_order], dtype=np.float64)
    result.ground_truth_ignores = gt_ignore
    return result


def COCOevalEvaluateImages(area_ranges, max_dets, iou_thresholds, ious, gts, dts):
    """Per image/category/area-range matching.

    Args:
        area_ranges: list of (min_area, max_area).
        max_dets: detections kept per image and category (highest scores).
        iou_thresholds: list of T thresholds.
        ious: ious[i][c] is a (D, G) array (or empty list) for image i, category c, with rows
            sorted by decreasing score.
        gts, dts: gts[i][c] / dts[i][c] are lists of :class:`InstanceAnnotation`.
    Returns:
        list of :class:`ImageEvaluation`, index ``c * A * I + a * I + i`` (pycocotools order).
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    num_images = len(gts)
    num_cats = len(ious[0]) if len(ious) else 0
    num_areas = len(area_ranges)
    results = [None] * (num_images * num_areas * num_cats)
    for i in range(num_images):
        for c in range(num_cats):
            det_list, gt_list = dts[i][c], gts[i][c]
            scores = np.array([d.score for d in det_list], dtype=np.float64)
            det_order = np.argsort(-scores, kind="stable")[:max_dets]
            for a, area_range in enumerate(area_ranges):
                slot = c * num_areas * num_images + a * num_images + i
                if not gt_list and not det_list:
                    results[slot] = ImageEvaluation()
                    continue
                results[slot] = _evaluate_one(
                    gt_list, det_list, det_order, ious[i][c], area_range, thresholds
                )
    return results


def _curves(evals, max_det, rec_thrs, num_thr):
    """Precision (T, R), scores (T, R), recall (T,) of one category/area/maxDets, or None."""
    valid_gt = sum(int(np.count_nonzero(~e.ground_truth_ignores)) for e in evals)
    if valid_gt == 0:
        return None
    scores = np.concatenate([e.detection_scores[:max_det] for e in evals])
    kept = [e for e in evals if len(e.detection_scores)]
    if kept:
        matches = np.concatenate([e.detection_matches[:, :max_det] for e in kept], axis=1)
        ignores = np.concatenate([e.detection_ignores[:, :max_det] for e in kept], axis=1)
    else:
        matches = np.zeros((num_thr, 0), dtype=np.uint64)
        ignores = np.zeros((num_thr, 0), dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, matches, ignores = scores[order], matches[:, order], ignores[:, order]
    tp = np.cumsum((matches > 0) & ~ignores, axis=1).astype(np.float64)
    fp = np.cumsum((matches == 0) & ~ignores, axis=1).astype(np.float64)
    num_det = tp.shape[1]
    precision = np.zeros((num_thr, len(rec_thrs)))
    score_at = np.zeros((num_thr, len(rec_thrs)))
    recall = np.zeros(num_thr)
    if num_det == 0:
        return precision, score_at, recall
    rc = tp / valid_gt
    pr = tp / (fp + tp + np.spacing(1))
    # Interpolated precision: best precision at this or any higher recall.
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    recall = rc[:, -1]
    for t in range(num_thr):
        at = np.searchsorted(rc[t], rec_thrs, side="left")
        hit = at < num_det
        precision[t, hit] = pr[t, at[hit]]
        score_at[t, hit] = scores[at[hit]]
    return precision, score_at, recall


def COCOevalAccumulate(params, evalImgs):
    """Precision/recall tables from :func:`COCOevalEvaluateImages` results.

    Args:
        params: pycocotools ``Params`` used for the evaluation.
        evalImgs: list returned by :func:`COCOevalEvaluateImages`.
    Returns:
        dict with "params", "counts" ([T, R, K, A, M]), "date", and flat (row-major)
        "precision" (T*R*K*A*M), "recall" (T*K*A*M), "scores" (T*R*K*A*M); -1 where undefined.
    """
    rec_thrs = np.asarray(params.recThrs, dtype=np.float64)
    max_dets = [int(m) for m in params.maxDets]
    num_thr, num_rec = len(params.iouThrs), len(rec_thrs)
    num_cats = len(params.catIds) if int(params.useCats) == 1 else 1
    num_areas, num_imgs = len(params.areaRng), len(params.imgIds)
    precision = -np.ones((num_thr, num_rec, num_cats, num_areas, len(max_dets)))
    scores = -np.ones((num_thr, num_rec, num_cats, num_areas, len(max_dets)))
    recall = -np.ones((num_thr, num_cats, num_areas, len(max_dets)))
    for k in range(num_cats):
        for a in range(num_areas):
            start = k * num_areas * num_imgs + a * num_imgs
            evals = [e for e in evalImgs[start : start + num_imgs] if e is not None]
            for m, max_det in enumerate(max_dets):
                curves = _curves(evals, max_det, rec_thrs, num_thr)
                if curves is None:
                    continue
                precision[:, :, k, a, m], scores[:, :, k, a, m], recall[:, k, a, m] = curves
    return {
        "params": params,
        "counts": [num_thr, num_rec, num_cats, num_areas, len(max_dets)],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "precision": precision.ravel(),
        "recall": recall.ravel(),
        "scores": scores.ravel(),
    }
