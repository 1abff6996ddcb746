"""Checks an exported file against the eager model: the whole job of ``mrcnn-export``.

Both sides give final results in the original image's coordinates: the eager model's
``forward`` (detectron2's ``detector_postprocess``) and the exported file's outputs through
the torch-free ``mrcnn_plugin.deploy.onnx_runner.postprocess`` (masks pasted, keypoints
decoded in numpy), so a pass also checks the deployed post-processing. Detections are compared
in order (both sort by score): the same count and classes, boxes and keypoints (x, y) within
a pixel tolerance, scores within an absolute tolerance, and each pasted mask's IoU with the
eager one at least ``mask_iou``.
"""

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import GeneralizedRCNN

from .deploy.onnx_runner import postprocess as deploy_postprocess
from .export import (
    FORMATS,
    ExportAdapter,
    export_metadata,
    export_onnx,
    export_torchscript,
    load_exported,
    load_image,
    nonstandard_onnx_ops,
    save_torchscript,
)

__all__ = ["TOLERANCES", "REPORT_NAME", "eager_results", "exported_results", "compare_results",
           "verify_exported", "export_and_verify"]  # fmt: skip

logger = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
# boxes and keypoints: max abs px; scores: max abs; mask_iou: min per instance.
TOLERANCES = {"boxes": 1e-3, "scores": 1e-4, "mask_iou": 0.99, "keypoints": 0.5}


def eager_results(
    model: GeneralizedRCNN, image: torch.Tensor, output_size: Optional[Tuple[int, int]] = None
) -> Dict[str, np.ndarray]:
    """The eager model's results for one model input, in the names of
    ``onnx_runner.postprocess``."""
    height, width = output_size or tuple(image.shape[1:])
    with torch.no_grad():
        inst = model([{"image": image, "height": height, "width": width}])[0]["instances"]
    results = {
        "boxes": inst.pred_boxes.tensor.numpy(),
        "scores": inst.scores.numpy(),
        "classes": inst.pred_classes.numpy(),
    }
    if inst.has("pred_masks"):
        results["masks"] = inst.pred_masks.numpy().astype(bool)
    if inst.has("pred_keypoints"):
        results["keypoints"] = inst.pred_keypoints.numpy()
    return results


def exported_results(
    run: Callable[[torch.Tensor], List[torch.Tensor]],
    output_names: Sequence[str],
    image: torch.Tensor,
    output_size: Optional[Tuple[int, int]] = None,
) -> Dict[str, np.ndarray]:
    """An exported model's outputs for one model input through the numpy post-processing."""
    outputs = {n: t.detach().cpu().numpy() for n, t in zip(output_names, run(image))}
    return deploy_postprocess(outputs, tuple(image.shape[1:]), output_size)


def _mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    flat = (len(a), int(np.prod(a.shape[1:])))  # -1 cannot be inferred for 0 masks
    inter = (a & b).reshape(flat).sum(1)
    union = (a | b).reshape(flat).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def compare_results(reference: dict, exported: dict, tolerances: Optional[dict] = None) -> dict:
    """{"num_detections": [ref, exp], "classes_equal", "boxes_max_abs_px", "scores_max_abs",
    "mask_iou_min", "keypoints_max_abs_px" (present fields only), "ok"}."""
    tol = dict(TOLERANCES, **(tolerances or {}))
    counts = [len(reference["scores"]), len(exported["scores"])]
    entry = {"num_detections": counts}
    if counts[0] != counts[1] or set(reference) != set(exported):
        entry["ok"] = False
        return entry

    def max_abs(name):
        diff = np.abs(reference[name].astype(np.float64) - exported[name].astype(np.float64))
        return float(diff.max()) if diff.size else 0.0

    entry["classes_equal"] = bool(np.array_equal(reference["classes"], exported["classes"]))
    entry["boxes_max_abs_px"] = max_abs("boxes")
    entry["scores_max_abs"] = max_abs("scores")
    ok = entry["classes_equal"]
    ok &= entry["boxes_max_abs_px"] <= tol["boxes"] and entry["scores_max_abs"] <= tol["scores"]
    if "masks" in reference:
        ious = _mask_ious(reference["masks"], exported["masks"])
        entry["mask_iou_min"] = float(ious.min()) if ious.size else 1.0
        ok &= entry["mask_iou_min"] >= tol["mask_iou"]
    if "keypoints" in reference:
        xy = np.abs(reference["keypoints"][..., :2] - exported["keypoints"][..., :2])
        entry["keypoints_max_abs_px"] = float(xy.max()) if xy.size else 0.0
        ok &= entry["keypoints_max_abs_px"] <= tol["keypoints"]
    entry["ok"] = bool(ok)
    return entry


def verify_exported(
    model: GeneralizedRCNN,
    path: str,
    output_names: Sequence[str],
    inputs: Sequence[Tuple[str, torch.Tensor, Tuple[int, int]]],
    tolerances: Optional[dict] = None,
) -> List[dict]:
    """Compares the exported file at ``path`` with the eager ``model`` on each (name, model
    input (3, H, W), original (height, width)); one :func:`compare_results` entry each."""
    run = load_exported(path)
    entries = []
    for name, image, size in inputs:
        entry = {"image": name, "input_shape": list(image.shape), "output_size": list(size)}
        reference = eager_results(model, image, size)
        entry.update(compare_results(reference, exported_results(run, output_names, image, size),
                                     tolerances))  # fmt: skip
        entries.append(entry)
    return entries


def export_and_verify(
    model: GeneralizedRCNN,
    cfg,
    fmt: str,
    output_dir: str,
    sample_images: Sequence[str],
    trace_image: Optional[str] = None,
    tolerances: Optional[dict] = None,
) -> dict:
    """Exports ``model`` traced on ``trace_image`` (default the first sample image) to
    ``output_dir``/FORMATS[fmt], then runs the written file and the eager model on every
    sample image (any sizes) and compares their results (:func:`compare_results`).

    Writes and returns the report (also ``output_dir``/export_report.json): ``{"format",
    "file", "traced_on", "traced_input_shape", "output_names", "tolerances", "ok", "images":
    [entry per sample image], "detection_counts_vary", "verified_sizes_other_than_traced",
    "nonstandard_ops" (ONNX)}``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not sample_images:
        raise ValueError("at least one sample image is needed to verify the model")
    trace_image = trace_image or sample_images[0]
    adapter = ExportAdapter(model, keypoints_in_graph=fmt != "onnx")
    traced_input = load_image(cfg, trace_image)[0]
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    metadata = export_metadata(cfg, adapter)
    if fmt == "torchscript":
        save_torchscript(export_torchscript(adapter, traced_input), path, metadata)
    else:
        export_onnx(adapter, traced_input, path, metadata=metadata)
    logger.info("Wrote %s (traced on %s, input %s)", path, trace_image, tuple(traced_input.shape))
    inputs = [(p, *load_image(cfg, p)) for p in sample_images]
    report = {
        "format": fmt,
        "file": path,
        "traced_on": trace_image,
        "traced_input_shape": list(traced_input.shape),
        "input": {"name": "image", "shape": [3, "height", "width"], "dtype": "float32"},
        "input_format": cfg.INPUT.FORMAT,
        "output_names": list(adapter.output_names),
        "tolerances": dict(TOLERANCES, **(tolerances or {})),
        "images": verify_exported(model, path, adapter.output_names, inputs, tolerances),
    }
    if fmt == "onnx":
        report["nonstandard_ops"] = nonstandard_onnx_ops(path)
    report["ok"] = all(e["ok"] for e in report["images"]) and not report.get("nonstandard_ops")
    report["detection_counts_vary"] = len({e["num_detections"][0] for e in report["images"]}) > 1
    report["verified_sizes_other_than_traced"] = len(
        {tuple(e["input_shape"]) for e in report["images"]} - {tuple(traced_input.shape)}
    )
    with open(os.path.join(output_dir, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=2)
    return report
