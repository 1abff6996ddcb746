"""Runs an ``mrcnn-export --format onnx`` model with ONNX Runtime: numpy, opencv, onnxruntime.

    python mrcnn_plugin/deploy/onnx_runner.py --model out/model.onnx --input a.jpg b.jpg \\
        --output predictions/ [--threads 4] [--score-thresh 0.5]

Writes ``predictions/<image name>.png`` (boxes, labels, masks and keypoints drawn) and
``predictions/predictions.json`` (COCO format: images, categories, annotations with scores).

This file imports no other module of the project (see ``mrcnn_plugin/deploy/__init__.py``).
The graph takes one (3, H, W) float32 image of any size in the model's channel order and
returns N detections in its coordinates: boxes, scores, classes, mask probabilities
(N, 1, M, M) and keypoint heatmaps (N, K, S, S). :func:`postprocess` is the numpy
counterpart of detectron2's ``detector_postprocess``: boxes rescaled to the original image and
clipped, empty boxes dropped, masks pasted at image resolution (``paste_masks_in_image``'s
bilinear sampling), keypoints decoded from the heatmaps (``heatmaps_to_keypoints``' bicubic
resize and peak) and rescaled.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["resize_shortest_edge", "paste_masks", "heatmaps_to_keypoints", "postprocess",
           "OnnxPredictor", "to_coco", "draw", "main"]  # fmt: skip

METADATA_KEY = "mrcnn_plugin"  # the ONNX metadata_props entry written by mrcnn-export


def resize_shortest_edge(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """detectron2's test-time ``ResizeShortestEdge``: the short side to ``min_size``, the long
    one at most ``max_size`` (0: no resize). Uses Pillow's bilinear resize as detectron2 does
    when Pillow is importable, else OpenCV's (a few grey levels apart when shrinking)."""
    h, w = image.shape[:2]
    if min_size <= 0:
        return image
    scale = min_size / min(h, w)
    newh, neww = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    newh, neww = int(newh + 0.5), int(neww + 0.5)
    if (newh, neww) == (h, w):
        return image
    try:
        from PIL import Image
    except ImportError:
        return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))


def _paste_one(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> Tuple:
    """(y0, x0, probabilities) of one (M, M) mask sampled over its box's pixels, as
    detectron2's ``_do_paste_mask`` on the CPU: ``grid_sample`` bilinear, zero outside."""
    f32 = np.float32
    x0_int = max(int(np.floor(box[0])) - 1, 0)
    y0_int = max(int(np.floor(box[1])) - 1, 0)
    x1_int = min(int(np.ceil(box[2])) + 1, width)
    y1_int = min(int(np.ceil(box[3])) + 1, height)
    x0, y0, x1, y1 = (f32(v) for v in box)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty box samples nothing
        gy = (np.arange(y0_int, y1_int, dtype=f32) + f32(0.5) - y0) / (y1 - y0) * f32(2) - f32(1)
        gx = (np.arange(x0_int, x1_int, dtype=f32) + f32(0.5) - x0) / (x1 - x0) * f32(2) - f32(1)
    m_h, m_w = mask.shape
    iy = ((gy + f32(1)) * f32(m_h) - f32(1)) / f32(2)  # grid_sample, align_corners=False
    ix = ((gx + f32(1)) * f32(m_w) - f32(1)) / f32(2)
    padded = np.pad(mask.astype(f32), 1)  # zeros outside, as padding_mode="zeros"
    iy0, ix0 = np.floor(iy), np.floor(ix)
    ty, tx = (iy - iy0)[:, None], (ix - ix0)[None, :]
    # Corner indices into the padded mask, clipped: beyond one pixel out all four are zeros.
    ry0 = np.clip(iy0.astype(np.int64) + 1, 0, m_h + 1)[:, None]
    ry1 = np.clip(iy0.astype(np.int64) + 2, 0, m_h + 1)[:, None]
    rx0 = np.clip(ix0.astype(np.int64) + 1, 0, m_w + 1)[None, :]
    rx1 = np.clip(ix0.astype(np.int64) + 2, 0, m_w + 1)[None, :]
    values = (padded[ry0, rx0] * (1 - ty) * (1 - tx) + padded[ry0, rx1] * (1 - ty) * tx
              + padded[ry1, rx0] * ty * (1 - tx) + padded[ry1, rx1] * ty * tx)  # fmt: skip
    return y0_int, x0_int, values


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> np.ndarray:
    """(N, M, M) mask probabilities in their (N, 4) boxes -> (N, height, width) bool masks, as
    detectron2's ``paste_masks_in_image``."""
    result = np.zeros((len(masks), height, width), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        y0, x0, values = _paste_one(mask, box, height, width)
        result[i, y0 : y0 + values.shape[0], x0 : x0 + values.shape[1]] = values >= threshold
    return result


def _bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic resize (A = -0.75, align_corners=False, clamped
    borders) along one axis."""
    a = -0.75
    real = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(real)
    t = real - base
    coeffs = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for k, c in enumerate(coeffs):
        np.add.at(weights, (rows, np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)), c)
    return weights.astype(np.float32)


def heatmaps_to_keypoints(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, K, S, S) heatmap logits, (N, 4) boxes -> (N, K, 3) x, y, score, as detectron2's
    ``heatmaps_to_keypoints`` (score: the peak's softmax over the resized map, normalised by
    the S x S map) with the raw logit dropped, as the eager model's ``pred_keypoints``."""
    maps = maps.astype(np.float32)
    boxes = boxes.astype(np.float32)
    result = np.zeros((len(maps), maps.shape[1], 3), dtype=np.float32)
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(1))
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(1))
    for i, heatmap in enumerate(maps):
        out_h, out_w = int(np.ceil(heights[i])), int(np.ceil(widths[i]))
        wy = _bicubic_weights(heatmap.shape[1], out_h)
        wx = _bicubic_weights(heatmap.shape[2], out_w)
        roi_map = np.einsum("yh,khw,xw->kyx", wy, heatmap, wx)
        flat = roi_map.reshape(len(heatmap), -1)
        peak = flat.max(1)
        pos = flat.argmax(1)
        pool_sum = np.exp(heatmap - peak[:, None, None]).sum((1, 2))
        x_int, y_int = pos % out_w, pos // out_w
        result[i, :, 0] = (x_int + np.float32(0.5)) * (widths[i] / np.ceil(widths[i])) + boxes[i, 0]
        result[i, :, 1] = (y_int + np.float32(0.5)) * (heights[i] / np.ceil(heights[i])) + boxes[
            i, 1
        ]
        result[i, :, 2] = 1.0 / pool_sum  # exp(peak - peak) / sum
    return result


def postprocess(
    outputs: Dict[str, np.ndarray],
    input_size: Tuple[int, int],
    output_size: Optional[Tuple[int, int]] = None,
    mask_threshold: float = 0.5,
) -> Dict[str, np.ndarray]:
    """The graph's outputs (name -> array) for an input of ``input_size`` (H, W) -> results in
    an image of ``output_size`` (default ``input_size``), as detectron2's
    ``detector_postprocess``: {"boxes" (N, 4) x0 y0 x1 y1, "scores" (N,), "classes" (N,),
    and when exported "masks" (N, height, width) bool, "keypoints" (N, K, 3) x y score}."""
    in_h, in_w = input_size
    out_h, out_w = output_size or input_size
    scale_x, scale_y = np.float32(out_w / in_w), np.float32(out_h / in_h)
    boxes = np.asarray(outputs["pred_boxes"], dtype=np.float32).reshape(-1, 4)
    keypoints = outputs.get("pred_keypoints")
    if keypoints is None and "pred_keypoint_heatmaps" in outputs:
        keypoints = heatmaps_to_keypoints(outputs["pred_keypoint_heatmaps"], boxes)
    scaled = boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    scaled[:, 0::2] = scaled[:, 0::2].clip(0, out_w)
    scaled[:, 1::2] = scaled[:, 1::2].clip(0, out_h)
    keep = (scaled[:, 2] > scaled[:, 0]) & (scaled[:, 3] > scaled[:, 1])
    results = {
        "boxes": scaled[keep],
        "scores": np.asarray(outputs["scores"], dtype=np.float32)[keep],
        "classes": np.asarray(outputs["pred_classes"]).astype(np.int64)[keep],
    }
    if "pred_masks" in outputs:
        probs = np.asarray(outputs["pred_masks"])[keep][:, 0]
        results["masks"] = paste_masks(probs, results["boxes"], out_h, out_w, mask_threshold)
    if keypoints is not None:
        keypoints = np.array(keypoints, dtype=np.float32)[keep]
        keypoints[:, :, 0] *= scale_x
        keypoints[:, :, 1] *= scale_y
        results["keypoints"] = keypoints
    return results


class OnnxPredictor:
    """``predictor(image)`` for an (H, W, 3) uint8 BGR image -> :func:`postprocess`'s dict in
    its coordinates. Reads the input format and test-time resize from the model's metadata."""

    def __init__(self, path: str, num_threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: ONNX Runtime's default
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path}: no '{METADATA_KEY}' metadata: not written by mrcnn-export")
        self.metadata = json.loads(meta[METADATA_KEY])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, model_input: np.ndarray) -> Dict[str, np.ndarray]:
        """The graph on one (3, H, W) float32 model input: output name -> array."""
        outputs = self.session.run(None, {"image": np.ascontiguousarray(model_input)})
        return dict(zip(self.output_names, outputs))

    def __call__(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        image = image_bgr if self.metadata["input_format"] == "BGR" else image_bgr[:, :, ::-1]
        resized = resize_shortest_edge(
            np.ascontiguousarray(image), self.metadata["min_size"], self.metadata["max_size"]
        )
        model_input = resized.astype(np.float32).transpose(2, 0, 1)
        outputs = self.run(model_input)
        return postprocess(outputs, resized.shape[:2], image.shape[:2])


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (H, W) bool mask: column-major run lengths, 0s first."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    edges = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(v) for v in mask.shape], "counts": [int(c) for c in counts]}


def to_coco(results: Dict[str, np.ndarray], image_id: int, metadata: dict) -> List[dict]:
    """COCO annotations (with "score") of one image's results; keypoints as detectron2's
    COCOEvaluator writes them (x, y shifted by -0.5 to COCO's pixel corners, then the score)."""
    ids = metadata.get("category_ids")
    annotations = []
    for i, (box, score, cls) in enumerate(
        zip(results["boxes"], results["scores"], results["classes"])
    ):
        x0, y0, x1, y1 = (float(v) for v in box)
        category = int(ids[cls] if ids else cls + 1)
        entry = {"image_id": image_id, "category_id": category, "score": float(score),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}  # fmt: skip
        if "masks" in results:
            entry["segmentation"] = _rle(results["masks"][i])
            entry["area"] = int(results["masks"][i].sum())
        else:
            entry["area"] = (x1 - x0) * (y1 - y0)
        if "keypoints" in results:
            kpts = results["keypoints"][i].astype(np.float64).copy()
            kpts[:, :2] -= 0.5
            entry["keypoints"] = [round(float(v), 3) for v in kpts.reshape(-1)]
            entry["num_keypoints"] = len(kpts)
        annotations.append(entry)
    return annotations


def draw(image_bgr: np.ndarray, results: Dict[str, np.ndarray], class_names: Sequence[str]):
    """A copy of the image with masks (blended), boxes, "class score" labels and keypoints."""
    canvas = image_bgr.copy()
    rng = np.random.default_rng(0)
    for i in range(len(results["scores"])):
        color = tuple(int(c) for c in rng.integers(64, 256, 3))
        if "masks" in results:
            m = results["masks"][i]
            canvas[m] = (0.5 * canvas[m] + 0.5 * np.array(color)).astype(np.uint8)
        x0, y0, x1, y1 = (int(round(float(v))) for v in results["boxes"][i])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 1)
        cls = int(results["classes"][i])
        name = class_names[cls] if cls < len(class_names) else str(cls)
        label = f"{name} {results['scores'][i]:.2f}"
        cv2.putText(canvas, label, (x0, max(y0 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1)
        for x, y, _ in results.get("keypoints", np.zeros((len(results["scores"]), 0, 3)))[i]:
            cv2.circle(canvas, (int(x), int(y)), 2, (0, 0, 255), -1)
    return canvas


def _keep(results: Dict[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
    return {name: value[keep] for name, value in results.items()}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model.onnx written by mrcnn-export")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE")
    parser.add_argument("--output", required=True, help="folder for drawings and JSON")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: auto)")
    parser.add_argument("--score-thresh", type=float, default=0.0,
                        help="drop detections below this score (the export's own threshold "
                             "applies first)")  # fmt: skip
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(args.model):
        raise SystemExit(f"onnx_runner: {args.model}: no such file")
    predictor = OnnxPredictor(args.model, args.threads)
    meta = predictor.metadata
    os.makedirs(args.output, exist_ok=True)
    names = meta.get("class_names") or []
    ids = meta.get("category_ids") or list(range(1, len(names) + 1))
    coco = {"images": [], "annotations": [],
            "categories": [{"id": int(i), "name": n} for i, n in zip(ids, names)]}  # fmt: skip
    for image_id, path in enumerate(args.input, start=1):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"onnx_runner: {path}: not a readable image")
        results = predictor(image)
        results = _keep(results, results["scores"] >= args.score_thresh)
        stem = os.path.splitext(os.path.basename(path))[0]
        cv2.imwrite(os.path.join(args.output, f"{stem}.png"), draw(image, results, names))
        coco["images"].append({"id": image_id, "file_name": path, "height": image.shape[0],
                               "width": image.shape[1]})  # fmt: skip
        coco["annotations"] += to_coco(results, image_id, meta)
        print(f"{path}: {len(results['scores'])} detections")
    for k, entry in enumerate(coco["annotations"], start=1):
        entry["id"] = k
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(coco, f)
    print(f"wrote {args.output}/predictions.json and {len(args.input)} drawn images")


if __name__ == "__main__":
    main()
