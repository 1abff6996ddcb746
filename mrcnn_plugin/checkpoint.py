"""Loading weights that must fit: every key is loaded, or the failure names the keys.

detectron2's ``DetectionCheckpointer`` reads the usual formats but only *warns* about keys that
are missing, unexpected or of the wrong shape, and goes on with randomly initialised weights in
their place; for inference that silently gives a broken model. ``load_checkpoint`` reads the
same formats (``.pth``; ``.pkl`` in Detectron2 model-zoo naming; ``.pkl`` with Caffe2 /
Detectron1 blob names, renamed by detectron2's own ``align_and_update_state_dicts``) and turns
every such key into an error, except, when asked for fine-tuning, the class-dependent predictor
layers whose shapes change with the number of classes (or keypoints): those are skipped, logged
and returned.

Files are read without running code from them: ``.pth`` with ``torch.load(weights_only=True)``,
``.pkl`` with an unpickler that only rebuilds numpy arrays and plain containers.
"""

import logging
import os
import pickle
import re
from typing import Dict, List, NamedTuple, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.utils.file_io import PathManager
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = [
    "PREDICTOR_PREFIXES",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "SkippedKey",
    "UnsafeCheckpointError",
    "is_predictor_key",
    "load_checkpoint",
    "read_checkpoint",
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

# The globals a pickle of numpy arrays in plain containers needs (numpy 1.x and 2.x module
# names; ``_codecs.encode`` is how protocol 2 stores bytes). Nothing else is imported.
PICKLE_GLOBALS = {
    (numpy_core + module, name)
    for numpy_core in ("numpy.core.", "numpy._core.")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                         ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
     ("builtins", "bytearray"), ("builtins", "complex")}  # fmt: skip


class SkippedKey(NamedTuple):
    """A model key left at its initial value: (name in the model, shape in the checkpoint,
    shape in the model)."""

    key: str
    checkpoint_shape: Tuple[int, ...]
    model_shape: Tuple[int, ...]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message names the file and the keys."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint refers to a global that is not an array, a tensor or a plain container."""


class CheckpointReadError(ValueError):
    """The file is not a checkpoint in a format read here; the message names the file."""


def is_predictor_key(key: str) -> bool:
    """True for the class-dependent predictor layers listed in ``PREDICTOR_PREFIXES``."""
    return key.startswith(PREDICTOR_PREFIXES)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside ``PICKLE_GLOBALS``."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # Detectron1 files were written by Python 2
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in PICKLE_GLOBALS:
            raise UnsafeCheckpointError(
                f"checkpoint {self.path} refers to {module}.{name}, which is not a numpy array "
                "or plain container; refusing to load it"
            )
        return super().find_class(module, name)


def _reason(error: Exception) -> str:
    """``Type: first line of the message`` (some of torch's and pickle's messages are empty)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is several paragraphs; the refused global is what matters.
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise UnsafeCheckpointError(
                f"checkpoint {path} refers to {refused.group(1)}, which is not a tensor or plain "
                "container; refusing to load it"
            ) from None
        raise CheckpointReadError(
            f"checkpoint {path}: not loadable with torch.load(weights_only=True) (not a file "
            "written by torch.save, or one holding more than tensors and plain containers)"
        ) from e
    except Exception as e:  # a truncated or foreign file fails anywhere in torch's reader
        raise CheckpointReadError(
            f"checkpoint {path} is not a file written by torch.save ({_reason(e)})"
        ) from e


def read_checkpoint(path: str) -> dict:
    """The dict saved in the checkpoint ``path`` (local, or a URL detectron2's PathManager
    resolves), read without running code from it: ``.pkl`` with an unpickler of numpy arrays
    and plain containers only, any other name with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: a local ``path`` that does not exist.
        UnsafeCheckpointError: the file refers to any other global (named in the message).
        CheckpointReadError: the file is not such a checkpoint, or does not hold a dict.
    """
    if not path:
        raise ValueError("no checkpoint path given")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    local = PathManager.get_local_path(path)
    if local.endswith(".pkl"):
        with open(local, "rb") as f:
            try:
                data = _ArrayUnpickler(f, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # truncated or not a pickle: any of pickle's own errors
                raise CheckpointReadError(
                    f"checkpoint {path} is not a readable pickle ({_reason(e)})"
                ) from e
    else:
        data = _torch_load(local)
    if not isinstance(data, dict):
        raise CheckpointReadError(f"checkpoint {path} holds a {type(data).__name__}, not a dict")
    return data


def _read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], bool, bool]:
    """(name -> tensor, whether the names need detectron2's matching heuristics, whether they
    are Caffe2 / Detectron1 names) of the checkpoint ``path``, formats as DetectionCheckpointer."""
    data = read_checkpoint(path)
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:  # Detectron2 model zoo
            weights, heuristics = data["model"], data.get("matching_heuristics", False)
            c2_names = False
        else:  # Caffe2 / Detectron1: detection models nest under "blobs", ImageNet ones do not
            weights = data.get("blobs", data)
            weights = {k: v for k, v in weights.items() if not k.endswith("_momentum")}
            heuristics = c2_names = True
    else:
        weights, heuristics, c2_names = data.get("model", data), False, False
    if not isinstance(weights, dict):
        raise CheckpointReadError(f"checkpoint {path}: its weights are a {type(weights).__name__}")
    tensors = {}
    for key, value in weights.items():
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise CheckpointMismatchError(f"checkpoint {path}: {key} is a {type(value).__name__}")
        tensors[key] = torch.as_tensor(value)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors, heuristics, c2_names


def _pair_renamed_mismatches(missing, unexpected, ckpt_shapes, model_shapes):
    """With name heuristics a checkpoint key that matched a model key by suffix but had another
    shape is not renamed: the model key is missing and the checkpoint key unexpected. Such pairs
    are shape mismatches, reported under the model's name; removed from the two lists."""
    mismatched = []
    for key in list(missing):
        suffixes = [u for u in unexpected if key.endswith("." + u)]
        if suffixes:
            match = max(suffixes, key=len)
            mismatched.append(SkippedKey(key, ckpt_shapes[match], model_shapes[key]))
            missing.remove(key)
            unexpected.remove(match)
    return mismatched


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
    """Loads the weights at ``path`` into ``model`` (in place).

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
        UnsafeCheckpointError, CheckpointReadError, FileNotFoundError: see ``read_checkpoint``.
    """
    if isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    weights, heuristics, c2_names = _read_weights(path)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if heuristics:
        weights = align_and_update_state_dicts(model.state_dict(), weights, c2_conversion=c2_names)
    ckpt_shapes = {k: tuple(v.shape) for k, v in weights.items()}
    mismatched = [
        SkippedKey(k, ckpt_shapes[k], model_shapes[k])
        for k in weights
        if k in model_shapes and ckpt_shapes[k] != model_shapes[k]
    ]
    for item in mismatched:
        del weights[item.key]
    result = model.load_state_dict(weights, strict=False)
    # As DetectionCheckpointer: old files may lack the input normalisation (set from the
    # config) and may hold anchors, which are non-persistent buffers now. Wrongly shaped
    # keys, removed above, are reported as mismatches, not as missing.
    ignored = {"pixel_mean", "pixel_std"} | {m.key for m in mismatched}  # those are reported
    missing = [k for k in result.missing_keys if k not in ignored]
    unexpected = [k for k in result.unexpected_keys if "anchor_generator.cell_anchors" not in k]
    mismatched += _pair_renamed_mismatches(missing, unexpected, ckpt_shapes, model_shapes)

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
