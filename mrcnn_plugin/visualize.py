"""Drawing predictions with detectron2's Visualizer (masks, boxes, class names, keypoints)."""

import logging
import os
from typing import List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer

from .checkpoint import load_checkpoint
from .engine.inference_modes import prepare_for_inference

logger = logging.getLogger(__name__)


def predictor_input(predictor: DefaultPredictor, image_bgr: np.ndarray) -> dict:
    """The model input ``predictor(image_bgr)`` builds: its test-time resize and format."""
    image = image_bgr[:, :, ::-1] if predictor.input_format == "RGB" else image_bgr
    height, width = image.shape[:2]
    resized = predictor.aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": height, "width": width}


def strict_predictor(
    cfg, inference_mode: Optional[str] = None, calibration_images: Sequence[np.ndarray] = ()
) -> DefaultPredictor:
    """``DefaultPredictor(cfg)`` with cfg.MODEL.WEIGHTS loaded by ``load_checkpoint``, which
    raises for keys that do not fit where DefaultPredictor's own loading only warns.

    ``inference_mode`` (exact, fast, quantized; see ``engine.inference_modes``) transforms the
    loaded model for CPU inference; None leaves it as detectron2 builds it. "quantized"
    calibrates on ``calibration_images`` (BGR uint8 arrays)."""
    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # DefaultPredictor then loads nothing
    predictor = DefaultPredictor(cfg)
    if weights:
        load_checkpoint(predictor.model, weights)
    else:
        logger.warning("No MODEL.WEIGHTS given: predicting with randomly initialised weights")
    if inference_mode is not None:
        calibration = [predictor_input(predictor, image) for image in calibration_images]
        predictor.model = prepare_for_inference(
            predictor.model, inference_mode, calibration=calibration
        )
    return predictor


def draw_predictions(image_bgr, instances, metadata, scale: float = 1.0):
    """Returns an RGB uint8 array (H, W, 3) of ``instances`` drawn over ``image_bgr``."""
    visualizer = Visualizer(
        image_bgr[:, :, ::-1], metadata, scale=scale, instance_mode=ColorMode.IMAGE
    )
    return visualizer.draw_instance_predictions(instances.to("cpu")).get_image()


def draw_dataset_predictions(
    cfg, dataset_name: str, output_dir: str, num_images: int = 8, scale: float = 3.0
) -> List[str]:
    """Runs ``strict_predictor(cfg)`` (which loads ``cfg.MODEL.WEIGHTS``) on the first
    ``num_images`` images of ``dataset_name`` and writes one PNG per image: the predictions
    (left) beside the ground truth (right). Returns the written paths."""
    predictor = strict_predictor(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = cv2.imread(record["file_name"])
        instances = predictor(image)["instances"]
        instances = instances[instances.scores >= cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST]
        predicted = draw_predictions(image, instances, metadata, scale)
        truth = Visualizer(image[:, :, ::-1], metadata, scale=scale).draw_dataset_dict(record)
        side_by_side = cv2.hconcat([predicted, truth.get_image()])
        path = os.path.join(output_dir, os.path.basename(record["file_name"]).rsplit(".", 1)[0])
        path += ".png"
        cv2.imwrite(path, side_by_side[:, :, ::-1])
        paths.append(path)
    return paths
