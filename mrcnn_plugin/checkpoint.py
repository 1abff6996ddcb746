"""Loading weights that must fit: every key is loaded, or the failure names the keys.

detectron2's ``DetectionCheckpointer`` reads all the usual formats (``.pth``; ``.pkl`` in
Detectron2 model-zoo naming; ``.pkl`` with Caffe2 / Detectron1 blob names, renamed by its
heuristics) but only *warns* about keys that are missing, unexpected or of the wrong shape, and
goes on with randomly initialised weights in their place. For inference that silently gives a
broken model, so ``load_checkpoint`` turns every such key into an error, except, when asked for
fine-tuning, the class-dependent predictor layers whose shapes change with the number of
classes (or keypoints): those are skipped, logged and returned.
"""

import logging
import os
from typing import Dict, List, NamedTuple, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import Checkpointer

__all__ = [
    "PREDICTOR_PREFIXES",
    "CheckpointMismatchError",
    "SkippedKey",
    "is_predictor_key",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

# Layers whose output size is the number of classes (or keypoints): the only ones a fine-tuning
# run may leave at their fresh initialisation.
PREDICTOR_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_head.predictor.",
    "roi_heads.keypoint_head.score_lowres.",
)


class SkippedKey(NamedTuple):
    """A model key left at its initial value: (name in the model, shape in the checkpoint,
    shape in the model)."""

    key: str
    checkpoint_shape: Tuple[int, ...]
    model_shape: Tuple[int, ...]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message names the file and the keys."""


def is_predictor_key(key: str) -> bool:
    """True for the class-dependent predictor layers listed in ``PREDICTOR_PREFIXES``."""
    return key.startswith(PREDICTOR_PREFIXES)


class _FinalStateRecorder(Checkpointer):
    """Records the shapes of the state dict handed to fvcore's loader, i.e. *after*
    DetectionCheckpointer renamed it, so rejected keys can be reported with their shape."""

    def _load_model(self, checkpoint):
        self.final_shapes = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
        return super()._load_model(checkpoint)


class _ReportingCheckpointer(DetectionCheckpointer, _FinalStateRecorder):
    """DetectionCheckpointer that keeps the incompatible-keys result of its last load.

    The MRO (DetectionCheckpointer -> _FinalStateRecorder -> Checkpointer) makes the recorder
    see the renamed state dict on its way to fvcore.
    """

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _shape_mismatches(checkpointer) -> Tuple[List[SkippedKey], List[str], List[str]]:
    """Splits the last load's incompatible keys into (shape mismatches, missing, unexpected).

    With name heuristics (``.pkl`` files) a checkpoint key that matched a model key by suffix
    but had another shape is not loaded: the model key shows up as missing and the checkpoint
    key as unexpected. Such pairs are shape mismatches, reported under the model's name.
    """
    incompatible = checkpointer.incompatible
    model_shapes = {k: tuple(v.shape) for k, v in checkpointer.model.state_dict().items()}
    ckpt_shapes: Dict[str, Tuple[int, ...]] = checkpointer.final_shapes

    def ckpt_shape(key):
        return ckpt_shapes.get(key, ckpt_shapes.get("module." + key, ()))

    mismatched = [SkippedKey(k, tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes]
    # fvcore drops wrongly shaped tensors before loading, so their keys are "missing" too.
    missing = [k for k in incompatible.missing_keys if k not in {m.key for m in mismatched}]
    unexpected = list(incompatible.unexpected_keys)
    for key in list(missing):
        suffixes = [u for u in unexpected if key.endswith("." + u)]
        if suffixes:
            match = max(suffixes, key=len)
            mismatched.append(SkippedKey(key, ckpt_shape(match), model_shapes[key]))
            missing.remove(key)
            unexpected.remove(match)
    return mismatched, missing, unexpected


def _error_message(path, mismatched, missing, unexpected) -> str:
    lines = [f"checkpoint {path} does not fit the model:"]
    for item in mismatched:
        lines.append(
            f"  shape mismatch: {item.key} is {item.checkpoint_shape} in the checkpoint but "
            f"{item.model_shape} in the model"
        )
    lines += [f"  missing from the checkpoint: {k}" for k in missing]
    lines += [f"  not in the model: {k}" for k in unexpected]
    if any(is_predictor_key(item.key) for item in mismatched):
        lines.append(
            "  (predictor layers differ in size when the number of classes differs; "
            "pass allow_head_mismatch=True to fine-tune)"
        )
    return "\n".join(lines)


def load_checkpoint(
    model: torch.nn.Module, path: str, *, allow_head_mismatch: bool = False
) -> List[SkippedKey]:
    """Loads the weights at ``path`` into ``model`` (in place) with DetectionCheckpointer.

    Args:
        model: the model to fill; a DistributedDataParallel wrapper is unwrapped.
        path: a ``.pth`` file, a Detectron2 model-zoo ``.pkl``, a Caffe2/Detectron1 ``.pkl``
            (``{"blobs": ...}`` or a bare name -> array dict), or a URL detectron2's
            PathManager resolves.
        allow_head_mismatch: for fine-tuning with another number of classes: predictor layers
            (``PREDICTOR_PREFIXES``) whose shape differs are skipped instead of failing.
    Returns:
        The skipped predictor keys (empty unless ``allow_head_mismatch``); each is logged.
    Raises:
        CheckpointMismatchError: any other key that is missing, unexpected or of the wrong
            shape; the model may then be partly loaded and should be discarded.
        FileNotFoundError: ``path`` is a local path that does not exist.
    """
    if not path:
        raise ValueError("load_checkpoint: no checkpoint path given")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    checkpointer = _ReportingCheckpointer(model)
    checkpointer.load(path, checkpointables=[])
    mismatched, missing, unexpected = _shape_mismatches(checkpointer)

    skipped = [m for m in mismatched if allow_head_mismatch and is_predictor_key(m.key)]
    rejected = [m for m in mismatched if m not in skipped]
    if rejected or missing or unexpected:
        raise CheckpointMismatchError(_error_message(path, rejected, missing, unexpected))
    for item in skipped:
        logger.warning(
            "%s: skipped %s (shape %s in the checkpoint, %s in the model): left at its "
            "initial value for fine-tuning",
            path,
            item.key,
            item.checkpoint_shape,
            item.model_shape,
        )
    return skipped
