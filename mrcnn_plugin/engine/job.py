"""One run of the main job: train a config, evaluate the final model, draw and plot it."""

import os
import time

from ..plotting import plot_metrics
from ..visualize import draw_dataset_predictions
from .trainer import MRCNNTrainer

__all__ = ["train_and_evaluate"]


def train_and_evaluate(cfg, num_drawn: int, draw_threshold: float = 0.5) -> dict:
    """Trains ``cfg`` with MRCNNTrainer, evaluates the final model on DATASETS.TEST and draws
    ``num_drawn`` of its images (detections scoring ``draw_threshold`` or more; evaluation uses
    all). Returns a JSON-ready summary: metrics, timings, paths of the outputs."""
    start = time.perf_counter()
    trainer = MRCNNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    results = MRCNNTrainer.test(cfg, trainer.model)
    eval_seconds = time.perf_counter() - start

    # Draw from the checkpoint written to disk, so the saved weights are what is shown.
    draw_cfg = cfg.clone()
    draw_cfg.defrost()
    draw_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    draw_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = draw_threshold
    drawn = draw_dataset_predictions(
        draw_cfg, cfg.DATASETS.TEST[0], os.path.join(cfg.OUTPUT_DIR, "predictions"), num_drawn
    )
    return {
        "metrics": {task: dict(values) for task, values in results.items()},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "iterations": cfg.SOLVER.MAX_ITER,
        "checkpoint": draw_cfg.MODEL.WEIGHTS,
        "training_curves": plot_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.json")),
        "drawn_predictions": drawn,
    }
