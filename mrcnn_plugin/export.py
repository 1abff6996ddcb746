"""Export of a plugin Mask R-CNN to TorchScript (tracing) or ONNX, checked against eager.

The exported graph is :class:`ExportAdapter`. Input ``image``: (3, H, W) float32 in
cfg.INPUT.FORMAT channel order (BGR for the plugin's configs), resized as DefaultPredictor
does (:func:`load_image`); normalization and padding are in the graph. Outputs, in the order of
``ExportAdapter.output_names``, N detections, in input coordinates: pred_boxes (N, 4) float32
x0, y0, x1, y1; scores (N,); pred_classes (N,) int64; pred_masks (N, 1, M, M) mask
probabilities of the predicted class (MASK_ON); pred_keypoints (N, K, 3) x, y, score and
pred_keypoint_heatmaps (N, K, S, S) logits (KEYPOINT_ON). Pasting masks into the image loops
over detections, so it stays out of the graph: :func:`postprocess` does it in eager code
(detectron2's ``detector_postprocess``) and returns what the eager model's ``forward`` returns.

Limits of the traced graph (tracing records one run of the Python code):
    * only the traced input size is verified, so the CLI takes sample images of one size (the
      ONNX input has fixed dims; a traced model ran exactly on 96x64 and 80x72 inputs after
      tracing at 64x64, as detectron2 keeps anchors and padding traceable, but unverified);
    * data-dependent Python branches keep their trace-time outcome, e.g. detectron2's
      ``if not valid_mask.all()`` in fast_rcnn.py / proposal_utils.py (non-finite boxes are not
      dropped) and ``len(boxes) < 40000`` in layers/nms.py;
    * keypoint decoding loops over detections: detectron2 scripts ``heatmaps_to_keypoints``
      when tracing (``script_if_tracing``), so the loop is in the graph; ONNX export of that
      scripted loop is not verified here;
    * a branch op with aggregation "max" and POOLER_SAMPLING_RATIO <= 0 loops over data-dependent
      RoI groups (roi_ops._roi_align_max): :func:`check_exportable` refuses it.
"""

import contextlib
import importlib.util
import json
import logging
import math
import os
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn

from .checkpoint import load_checkpoint
from .modeling.poolers import roi_op_of_head

__all__ = [
    "FORMATS",
    "ExportAdapter",
    "check_exportable",
    "load_image",
    "export_torchscript",
    "export_onnx",
    "load_exported",
    "postprocess",
    "compare_outputs",
    "build_exportable_model",
    "export_and_verify",
]

logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_OPSET = 17
REPORT_NAME = "export_report.json"


class ExportAdapter(nn.Module):
    """Wraps a ``GeneralizedRCNN`` for tracing: ``forward(image (3, H, W)) -> tuple`` of the
    tensors named by ``output_names`` (see the module docstring)."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        if not isinstance(model, GeneralizedRCNN):
            raise TypeError(f"ExportAdapter needs a GeneralizedRCNN, got {type(model).__name__}")
        self.model = model.eval()
        self.output_names: List[str] = ["pred_boxes", "scores", "pred_classes"]
        if getattr(model.roi_heads, "mask_on", False):
            self.output_names.append("pred_masks")
        if getattr(model.roi_heads, "keypoint_on", False):
            self.output_names += ["pred_keypoints", "pred_keypoint_heatmaps"]

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        outputs = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
        return outputs + tuple(instances.get(name) for name in self.output_names[3:])


def check_exportable(cfg) -> None:
    """Raises ValueError for settings whose inference cannot be traced faithfully."""
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ValueError(f"only GeneralizedRCNN exports, not {cfg.MODEL.META_ARCHITECTURE}")
    heads = ["ROI_BOX_HEAD"]
    if cfg.MODEL.MASK_ON:
        heads.append("ROI_MASK_HEAD")
    if cfg.MODEL.KEYPOINT_ON:
        heads.append("ROI_KEYPOINT_HEAD")
    # Each branch may choose its own op (MODEL.MRCNN.ROI_OP.{BOX,MASK,KEYPOINT}).
    adaptive_max = [
        h
        for h in heads
        if roi_op_of_head(cfg, h).AGGREGATION == "max" and cfg.MODEL[h].POOLER_SAMPLING_RATIO <= 0
    ]
    if adaptive_max:
        raise ValueError(
            "RoI op aggregation 'max' with an adaptive sampling ratio (POOLER_SAMPLING_RATIO "
            f"<= 0 in {adaptive_max}) loops over data-dependent RoI groups and cannot be traced; "
            "set a fixed POOLER_SAMPLING_RATIO"
        )


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    # detectron2 emits dozens of TracerWarnings for shape asserts; the module docstring lists
    # the branches that matter and verification catches the rest.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# ---- input, export, running, postprocessing ----


def load_image(cfg, path: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Reads ``path`` in cfg.INPUT.FORMAT and resizes it as DefaultPredictor does.

    Returns:
        (3, H, W) float32 tensor, the model input; (height, width) of the original image.
    """
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
    return tensor, tuple(image.shape[:2])


def export_torchscript(adapter: ExportAdapter, image: torch.Tensor) -> torch.jit.ScriptModule:
    """Traces ``adapter`` on ``image`` (3, H, W)

    check_trace is off: its re-run compares against a second eager run, which adds time but
    no check of other inputs; verify with :func:`compare_outputs` on held-out images instead.
    """
    with torch.no_grad(), _quiet_tracing():
        return torch.jit.trace(adapter, (image,), check_trace=False)


def export_onnx(
    adapter: ExportAdapter, image: torch.Tensor, path: str, opset: int = ONNX_OPSET
) -> None:
    """Writes ``adapter`` traced on ``image`` as ONNX (TorchScript-based exporter: the dynamo
    exporter needs onnxscript and cannot follow detectron2's Python structures). The input
    size is fixed; the detection axis of every output is dynamic ("detections")."""
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the onnx package (pip install onnx)", name="onnx")
    with torch.no_grad(), _quiet_tracing():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        torch.onnx.export(
            adapter,
            (image,),
            path,
            input_names=["image"],
            output_names=list(adapter.output_names),
            dynamic_axes={name: {0: "detections"} for name in adapter.output_names},
            opset_version=opset,
            dynamo=False,
        )


def load_exported(path: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """A function running an exported file: image (3, H, W) -> its outputs as a list.
    ``.onnx`` files run with onnxruntime on the CPU (ImportError without it); others are
    loaded with ``torch.jit.load``."""
    if path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_onnx(image: torch.Tensor) -> List[torch.Tensor]:
            outputs = session.run(None, {input_name: image.detach().cpu().numpy()})
            return [torch.from_numpy(np.asarray(out)) for out in outputs]

        return run_onnx
    module = torch.jit.load(path)

    def run_torchscript(image: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            return list(module(image))

    return run_torchscript


def postprocess(
    outputs: Dict[str, torch.Tensor],
    image_size: Tuple[int, int],
    output_size: Optional[Tuple[int, int]] = None,
    mask_threshold: float = 0.5,
) -> Instances:
    """The exported outputs as the eager model's ``forward`` returns them.

    Args:
        outputs: name -> tensor, as ``dict(zip(adapter.output_names, outputs))``.
        image_size: (H, W) of the model input.
        output_size: (height, width) to rescale to (the original image); default image_size.
    Returns:
        Instances with pred_boxes, scores, pred_classes, and when exported pred_masks (bool
        (N, height, width), pasted at ``mask_threshold``), pred_keypoints (N, K, 3) and
        pred_keypoint_heatmaps.
    """
    height, width = output_size or image_size
    # detector_postprocess rescales boxes and keypoints in place: keep the caller's tensors.
    fields = {name: value.clone() for name, value in outputs.items()}
    fields["pred_boxes"] = Boxes(fields["pred_boxes"])
    instances = Instances(tuple(image_size), **fields)
    return detector_postprocess(instances, height, width, mask_threshold)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def compare_outputs(
    names: Sequence[str], reference: Sequence[torch.Tensor], exported: Sequence[torch.Tensor]
) -> dict:
    """Max absolute difference of each output (inf for a shape mismatch) and the detection
    counts: ``{"num_detections": [ref, exp], "max_abs_diff": {name: float}}``."""
    if len(reference) != len(names) or len(exported) != len(names):
        raise ValueError(f"expected {len(names)} outputs, got {len(reference)}, {len(exported)}")
    return {
        "num_detections": [int(reference[0].shape[0]), int(exported[0].shape[0])],
        "max_abs_diff": {n: _max_abs_diff(r, e) for n, r, e in zip(names, reference, exported)},
    }


# ---- the whole job, as the CLI runs it ----


def build_exportable_model(cfg) -> GeneralizedRCNN:
    """The model of ``cfg`` in eval mode with MODEL.WEIGHTS loaded strictly (random weights,
    with a warning, when it is empty)."""
    check_exportable(cfg)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_checkpoint(model, cfg.MODEL.WEIGHTS)
    else:
        logger.warning("No MODEL.WEIGHTS given: exporting randomly initialised weights")
    return model


def _exported_runner(path: str):
    """(load_exported(path), None), or (None, why) when the file cannot be run here."""
    if path.endswith(".onnx"):
        try:
            import onnx

            onnx.checker.check_model(path)
            return load_exported(path), None
        except ImportError as e:
            return None, f"not verified: {e.name} is not installed (pip install onnx onnxruntime)"
    return load_exported(path), None


def export_and_verify(
    model: GeneralizedRCNN,
    cfg,
    fmt: str,
    output_dir: str,
    sample_images: Sequence[str],
    atol: float = 1e-3,
) -> dict:
    """Exports ``model`` traced on the first sample image to ``output_dir``/FORMATS[fmt], then
    runs the written file and the eager model on every sample image and compares them.

    All sample images must have the traced input size after resizing (see the module
    docstring). Writes and returns the report (also ``output_dir``/export_report.json):
    ``{"format", "file", "input", "output_names", "atol", "ok", "images": [{"image",
    "num_detections": [eager, exported], "max_abs_diff": {name: float}, "ok"}], ...}``;
    "ok" is None when the file cannot be run here (ONNX without onnxruntime).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not sample_images:
        raise ValueError("at least one sample image is needed to trace the model")
    adapter = ExportAdapter(model)
    inputs = [load_image(cfg, path)[0] for path in sample_images]
    shape = tuple(inputs[0].shape)
    for path, image in zip(sample_images, inputs):
        if tuple(image.shape) != shape:
            raise ValueError(
                f"{path} resizes to {tuple(image.shape)} but the model is traced at {shape}: "
                "the exported graph has a fixed input size"
            )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    if fmt == "torchscript":
        export_torchscript(adapter, inputs[0]).save(path)
    else:
        export_onnx(adapter, inputs[0], path)
    logger.info("Wrote %s (traced on %s, input %s)", path, sample_images[0], shape)

    report = {
        "format": fmt,
        "file": path,
        "traced_on": sample_images[0],
        "input": {"name": "image", "shape": list(shape), "dtype": "float32"},
        "input_format": cfg.INPUT.FORMAT,
        "output_names": list(adapter.output_names),
        "atol": atol,
        "ok": None,
        "images": [],
    }
    run_exported, reason = _exported_runner(path)
    if run_exported is None:
        report["skipped"] = reason
        logger.warning("%s", reason)
    else:
        for image_path, image in zip(sample_images, inputs):
            with torch.no_grad():
                reference = list(adapter(image))
            entry = {"image": image_path}
            entry.update(compare_outputs(adapter.output_names, reference, run_exported(image)))
            counts = entry["num_detections"]
            diffs = entry["max_abs_diff"].values()
            entry["ok"] = counts[0] == counts[1] and all(d <= atol for d in diffs)
            report["images"].append(entry)
        report["ok"] = all(entry["ok"] for entry in report["images"])
        # Only images with another detection count than the tracing one test the dynamic axes.
        counts = {entry["num_detections"][0] for entry in report["images"]}
        report["detection_counts_vary"] = len(counts) > 1
    with open(os.path.join(output_dir, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=2)
    return report
