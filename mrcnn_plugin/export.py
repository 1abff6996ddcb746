"""Export of a plugin Mask R-CNN / Keypoint R-CNN to TorchScript (tracing) or ONNX.

The exported graph is :class:`ExportAdapter`, one for both formats. Input ``image``: (3, H, W)
float32 of ANY height and width (both formats: the ONNX input has dynamic axes "height" and
"width") in cfg.INPUT.FORMAT channel order (BGR for the plugin's configs), resized as
DefaultPredictor does (:func:`load_image`); normalization and padding are in the graph.
Outputs, in the order of ``ExportAdapter.output_names``, N detections ("detections" axis), in
input coordinates: pred_boxes (N, 4) float32 x0, y0, x1, y1; scores (N,); pred_classes (N,)
int64; pred_masks (N, 1, M, M) mask probabilities of the predicted class (MASK_ON);
pred_keypoints (N, K, 3) x, y, score (KEYPOINT_ON, TorchScript only) and
pred_keypoint_heatmaps (N, K, S, S) logits (KEYPOINT_ON). Pasting masks (and, for ONNX,
decoding keypoints) loops over detections, so it stays out of the graph: the numpy
``mrcnn_plugin.deploy.onnx_runner.postprocess`` does it without torch, :func:`postprocess`
with detectron2's ``detector_postprocess``; both return what the eager model returns.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` on a trace. The
dynamo-based exporter (``torch.export``) stops at detectron2's first data-dependent shape
(``ImageList.from_tensors`` pads by a tensor-valued amount, then ``Conv2d`` tests
``x.numel() == 0``: GuardOnDataDependentSymNode) and, past that, every Python branch on a
detection count in detectron2's heads; tracing records detectron2's trace-friendly paths
(tensor-valued sizes, anchors and padding), which then follow any input size.

Limits of the traced graph (tracing records one run of the Python code), checked by
``mrcnn_plugin.export_verify`` at other input sizes and detection counts than the traced ones
(the per-image splits by the traced proposal count, and GroupNorm on zero RoIs in ONNX, are
fixed in the written graph: ``mrcnn_plugin.export_graph``):
    * data-dependent Python branches keep their trace-time outcome, e.g. detectron2's
      ``if not valid_mask.all()`` in fast_rcnn.py / proposal_utils.py (non-finite boxes are not
      dropped) and ``len(boxes) < 40000`` in layers/nms.py; config values such as
      MODEL.ROI_HEADS.SCORE_THRESH_TEST and TEST.DETECTIONS_PER_IMAGE are constants of the file;
    * keypoint decoding loops over detections: detectron2 scripts ``heatmaps_to_keypoints``
      when tracing, which TorchScript keeps and the ONNX exporter cannot convert, hence
      ``keypoints_in_graph=False`` for ONNX;
    * a branch op with aggregation "max" and POOLER_SAMPLING_RATIO <= 0 loops over data-dependent
      RoI groups (roi_ops._roi_align_max): :func:`check_exportable` refuses it.
"""

import contextlib
import importlib.util
import json
import logging
import math
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
from .export_graph import (
    group_norm_for_empty_batches,
    remove_single_piece_splits,
    replace_single_output_splits,
)
from .modeling.poolers import roi_op_of_head

__all__ = [
    "FORMATS",
    "ExportAdapter",
    "check_exportable",
    "load_image",
    "export_torchscript",
    "save_torchscript",
    "export_onnx",
    "load_exported",
    "postprocess",
    "compare_outputs",
    "build_exportable_model",
    "export_metadata",
    "nonstandard_onnx_ops",
]

logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_OPSET = 17  # RoiAlign with aligned=True (half_pixel) needs opset >= 16
METADATA_KEY = "mrcnn_plugin"  # ONNX metadata_props key / TorchScript extra file stem


class ExportAdapter(nn.Module):
    """Wraps a ``GeneralizedRCNN`` for tracing: ``forward(image (3, H, W)) -> tuple`` of the
    tensors named by ``output_names`` (see the module docstring).

    ``keypoints_in_graph=False`` (the ONNX export) leaves detectron2's keypoint decoding,
    a scripted per-detection loop that the ONNX exporter cannot convert, out of the graph: the
    keypoint branch is then run as its pooler and head layers only and ``pred_keypoints`` is
    not an output (``mrcnn_plugin.deploy.onnx_runner.postprocess`` decodes the heatmaps).
    """

    def __init__(self, model: GeneralizedRCNN, keypoints_in_graph: bool = True):
        super().__init__()
        if not isinstance(model, GeneralizedRCNN):
            raise TypeError(f"ExportAdapter needs a GeneralizedRCNN, got {type(model).__name__}")
        self.model = model
        # Eval mode on the adapter itself: exporters restore the wrapper's mode afterwards.
        self.eval()
        heads = model.roi_heads
        self.keypoint_on = bool(getattr(heads, "keypoint_on", False))
        self.keypoints_in_graph = keypoints_in_graph or not self.keypoint_on
        if not self.keypoints_in_graph:
            missing = [
                name
                for name in ("keypoint_in_features", "keypoint_pooler", "keypoint_head")
                if getattr(heads, name, None) is None
            ]
            if missing or model.proposal_generator is None:
                raise ValueError(
                    f"{type(heads).__name__} has no {missing or ['proposal_generator']}: its "
                    "keypoint heatmaps cannot be exported apart from their decoding"
                )
        self.output_names: List[str] = ["pred_boxes", "scores", "pred_classes"]
        if getattr(heads, "mask_on", False):
            self.output_names.append("pred_masks")
        if self.keypoint_on:
            self.output_names += ["pred_keypoints"] if self.keypoints_in_graph else []
            self.output_names.append("pred_keypoint_heatmaps")

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.keypoints_in_graph:
            instances = self.model.inference([{"image": image}], do_postprocess=False)[0]
        else:
            instances = self._inference_with_keypoint_heatmaps(image)
        return tuple(instances.get(name) if name != "pred_boxes" else instances.pred_boxes.tensor
                     for name in self.output_names)  # fmt: skip

    def _inference_with_keypoint_heatmaps(self, image: torch.Tensor) -> Instances:
        """GeneralizedRCNN.inference with the keypoint branch's decoding left out: the ROI
        heads run with ``keypoint_on`` off, then the keypoint pooler and head layers."""
        model, heads = self.model, self.model.roi_heads
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        heads.keypoint_on = False
        try:
            instances = heads(images, features, proposals)[0][0]
        finally:
            heads.keypoint_on = True
        pooled = heads.keypoint_pooler(
            [features[f] for f in heads.keypoint_in_features], [instances.pred_boxes]
        )
        instances.pred_keypoint_heatmaps = heads.keypoint_head.layers(pooled)
        return instances


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


def export_metadata(cfg, adapter: ExportAdapter) -> dict:
    """What a runner needs besides the graph: input format, test-time resize, output names,
    class names and dataset category ids (from cfg.DATASETS.TEST[0]'s metadata when it is
    registered), keypoint names."""
    from detectron2.data import MetadataCatalog

    meta = {"input_format": cfg.INPUT.FORMAT, "min_size": int(cfg.INPUT.MIN_SIZE_TEST),
            "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "output_names": list(adapter.output_names),
            "class_names": [], "category_ids": [], "keypoint_names": []}  # fmt: skip
    if cfg.DATASETS.TEST and cfg.DATASETS.TEST[0] in MetadataCatalog.list():
        dataset = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        meta["class_names"] = list(dataset.get("thing_classes", []))
        to_contiguous = dataset.get("thing_dataset_id_to_contiguous_id", {})
        meta["category_ids"] = [
            int(k) for k, _ in sorted(to_contiguous.items(), key=lambda kv: kv[1])
        ]
        meta["keypoint_names"] = list(dataset.get("keypoint_names", []))
    return meta


def export_torchscript(adapter: ExportAdapter, image: torch.Tensor) -> torch.jit.ScriptModule:
    """Traces ``adapter`` on ``image`` (3, H, W); save it with :func:`save_torchscript`.

    check_trace is off: its re-run compares against a second eager run, which adds time but
    no check of other inputs; ``export_verify`` checks other sizes and images instead.
    """
    with torch.no_grad(), _quiet_tracing():
        module = torch.jit.trace(adapter, (image,), check_trace=False)
    remove_single_piece_splits(module)  # per-image splits by the traced proposal count
    return module


def save_torchscript(
    module: torch.jit.ScriptModule, path: str, metadata: Optional[dict] = None
) -> None:
    """Saves ``module`` with ``metadata`` (JSON) as its extra file ``mrcnn_plugin.json``."""
    module.save(path, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata or {})})


def export_onnx(
    adapter: ExportAdapter,
    image: torch.Tensor,
    path: str,
    opset: int = ONNX_OPSET,
    metadata: Optional[dict] = None,
) -> None:
    """Writes ``adapter`` traced on ``image`` as ONNX with the TorchScript-based exporter (see
    the module docstring for why not the dynamo one). The input's height and width and the
    detection axis of every output are dynamic. ``adapter`` must have keypoints_in_graph
    False for a keypoint model. ``metadata`` (JSON) goes into the file's metadata_props."""
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the onnx package (pip install onnx)", name="onnx")
    import onnx

    if adapter.keypoint_on and adapter.keypoints_in_graph:
        raise ValueError("ONNX export of a keypoint model needs ExportAdapter(model, "
                         "keypoints_in_graph=False)")  # fmt: skip
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    dynamic_axes.update({name: {0: "detections"} for name in adapter.output_names})
    with torch.no_grad(), _quiet_tracing(), group_norm_for_empty_batches(opset):
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script in detectron2
        torch.onnx.export(
            adapter,
            (image,),
            path,
            input_names=["image"],
            output_names=list(adapter.output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(path)
    replace_single_output_splits(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata or {})
    onnx.save(proto, path)
    onnx.checker.check_model(path)


def nonstandard_onnx_ops(path: str) -> List[str]:
    """ "domain::op" of every node (subgraphs included) outside the standard ONNX domain."""
    import onnx

    found = set()
    graphs = [onnx.load(path).graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                found.add(f"{node.domain}::{node.op_type}")
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sorted(found)


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
