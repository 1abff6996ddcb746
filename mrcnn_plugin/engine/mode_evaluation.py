"""COCO evaluation of a trained model in a CPU inference mode (exact, fast, quantized).

``evaluate_in_mode`` prepares a copy of the model (the trained one is left as it is, so a
caller can evaluate it in every mode in turn) and runs ``MRCNNTrainer.test`` on it; quantized
mode is calibrated on the first images of the training set, read by detectron2's test loader
(test-time resizing, no augmentation), which is the one command ``--mode quantized`` needs.
"""

import copy
import itertools
import logging
import time
from typing import List, Optional

from detectron2.data import build_detection_test_loader
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .cpu_features import cpu_has_int8
from .inference_modes import prepare_for_inference
from .trainer import MRCNNTrainer

__all__ = ["CALIBRATION_IMAGES", "calibration_inputs", "evaluate_in_mode"]

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 4  # int8 activation ranges settle on a handful of images


def calibration_inputs(cfg, count: int = CALIBRATION_IMAGES) -> List[dict]:
    """The first ``count`` images of DATASETS.TRAIN[0] as batched-input dicts."""
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0])
    return [batch[0] for batch in itertools.islice(loader, count)]


def evaluate_in_mode(
    cfg, model: nn.Module, mode: str, calibration: Optional[List[dict]] = None
) -> dict:
    """Evaluates ``model`` (CPU, trained) on DATASETS.TEST in inference ``mode`` (or the mode
    the CPU falls back to). Returns {"mode": run, "requested": mode, "results": {task: {metric:
    value}}, "seconds": evaluation time}. ``calibration``: see :func:`calibration_inputs`."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    model = copy.deepcopy(model)
    if mode == "quantized" and calibration is None and cpu_has_int8():
        calibration = calibration_inputs(cfg)
    prepared = prepare_for_inference(model, mode, calibration=calibration)
    start = time.perf_counter()
    results = MRCNNTrainer.test(cfg, prepared)
    seconds = time.perf_counter() - start
    logger.info("Evaluated in mode %r in %.1f s", prepared.mode, seconds)
    return {
        "mode": prepared.mode,
        "requested": mode,
        "results": {task: dict(values) for task, values in results.items()},
        "seconds": round(seconds, 1),
    }
