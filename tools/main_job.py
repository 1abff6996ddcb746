#!/usr/bin/env python
"""The main job: train the plugin's models on the project's synthetic data on the CPU,
evaluate them with detectron2's COCOEvaluator and draw their predictions.

    python tools/main_job.py --output-dir output/main_job [--tasks shapes persons]

Tasks: ``shapes`` (Mask R-CNN, bbox + segm AP) and ``persons`` (Keypoint R-CNN, bbox +
keypoints AP). Each writes under ``<output-dir>/<task>/``: detectron2's training output
(model_final.pth, metrics.json, TensorBoard events, COCO evaluation files), ``metrics.png``
(training curves) and ``predictions/*.png`` (predictions left, ground truth right). The AP
numbers and timings of all tasks go to ``<output-dir>/summary.json``, with each task's AP in
every CPU inference mode this CPU runs (exact always; fast with bfloat16 units; quantized with
int8 units) beside detectron2's plain evaluation.
"""

import argparse
import json
import logging
import os
import time

import torch
from detectron2.utils.logger import setup_logger

from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data.catalog import DEFAULT_DATA_ROOT, register_synthetic_datasets
from mrcnn_plugin.engine import MRCNNTrainer
from mrcnn_plugin.engine.inference_modes import INFERENCE_MODES, resolve_mode
from mrcnn_plugin.engine.mode_evaluation import evaluate_in_mode
from mrcnn_plugin.plotting import plot_metrics
from mrcnn_plugin.visualize import draw_dataset_predictions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_CONFIGS = {
    "shapes": os.path.join(ROOT, "configs/Synthetic/mask_rcnn_R_18_FPN_shapes.yaml"),
    "persons": os.path.join(ROOT, "configs/Synthetic/keypoint_rcnn_R_18_FPN_persons.yaml"),
}
DRAW_THRESHOLD = 0.5  # detections drawn; evaluation uses all of them


def train_and_evaluate(cfg, num_drawn):
    """Trains, evaluates the final model and draws predictions; returns a summary dict."""
    start = time.perf_counter()
    trainer = MRCNNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    results = MRCNNTrainer.test(cfg, trainer.model)
    eval_seconds = time.perf_counter() - start
    modes = {}
    if cfg.MODEL.DEVICE == "cpu":
        # Only the modes this CPU really runs: a fallback would repeat exact mode's numbers.
        for mode in dict.fromkeys(resolve_mode(m) for m in INFERENCE_MODES):
            modes[mode] = evaluate_in_mode(cfg, trainer.model, mode)

    # Draw from the checkpoint written to disk, so the saved weights are what is shown.
    draw_cfg = cfg.clone()
    draw_cfg.defrost()
    draw_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    draw_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = DRAW_THRESHOLD
    drawn = draw_dataset_predictions(
        draw_cfg, cfg.DATASETS.TEST[0], os.path.join(cfg.OUTPUT_DIR, "predictions"), num_drawn
    )
    return {
        "metrics": {task: dict(values) for task, values in results.items()},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "inference_modes": modes,
        "iterations": cfg.SOLVER.MAX_ITER,
        "checkpoint": draw_cfg.MODEL.WEIGHTS,
        "training_curves": plot_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.json")),
        "drawn_predictions": drawn,
    }


def _ap_line(metrics) -> str:
    return ", ".join(f"{name} AP {values['AP']:.1f}" for name, values in metrics.items())


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/main_job")
    parser.add_argument(
        "--data-root", default=DEFAULT_DATA_ROOT, help="where synthetic data is written"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=sorted(TASK_CONFIGS), default=["shapes", "persons"]
    )
    parser.add_argument("--num-drawn", type=int, default=8, help="validation images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()

    logger = setup_logger()
    setup_logger(name="mrcnn_plugin")
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {}
    for task in args.tasks:
        torch.manual_seed(0)
        cfg = build_cfg(TASK_CONFIGS[task], args.opts)
        cfg.OUTPUT_DIR = os.path.join(args.output_dir, task)
        cfg.freeze()
        register_synthetic_datasets(
            cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), args.data_root
        )
        summary[task] = train_and_evaluate(cfg, args.num_drawn)
        write_json(os.path.join(args.output_dir, "summary.json"), summary)

    for task, result in summary.items():
        aps = _ap_line(result["metrics"])
        logger.info(
            "%s: %s (train %.0f s, eval %.0f s)",
            task,
            aps,
            result["train_seconds"],
            result["eval_seconds"],
        )
        for mode, run in result["inference_modes"].items():
            aps = _ap_line(run["results"])
            logger.info("%s, inference mode %s: %s (eval %.0f s)", task, mode, aps, run["seconds"])
        logger.info(
            "%s: drawn predictions in %s", task, os.path.dirname(result["drawn_predictions"][0])
        )
        logger.info("%s: training curves in %s", task, result["training_curves"])
    logger.info("summary: %s", os.path.join(args.output_dir, "summary.json"))
    logging.shutdown()


if __name__ == "__main__":
    main()
