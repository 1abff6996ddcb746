#!/usr/bin/env python
"""The main job: train the plugin's Mask R-CNN on the synthetic ``shapes`` data on the CPU,
evaluate it with detectron2's COCOEvaluator, and draw predictions on validation images.

    python tools/main_job.py --output-dir output/main_job [KEY VALUE ...]

Writes under --output-dir: ``shapes/`` (detectron2's training output: checkpoints,
metrics.json, TensorBoard events, COCO evaluation files), ``shapes/predictions/*.png`` and
``summary.json`` (AP numbers and timings).
"""

import argparse
import json
import logging
import os
import time

import torch
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from mrcnn_plugin import add_mrcnn_config
from mrcnn_plugin.data import register_shapes
from mrcnn_plugin.engine import MRCNNTrainer
from mrcnn_plugin.visualize import draw_dataset_predictions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = os.path.join(ROOT, "configs/Synthetic/mask_rcnn_R_18_FPN_shapes.yaml")


def build_cfg(config_file, output_dir, opts):
    cfg = get_cfg()
    add_mrcnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def train_and_evaluate(cfg, num_drawn):
    """Trains, evaluates the final checkpoint and draws predictions; returns a summary dict."""
    start = time.perf_counter()
    trainer = MRCNNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    results = MRCNNTrainer.test(cfg, trainer.model)
    eval_seconds = time.perf_counter() - start

    # Draw from the checkpoint written to disk, so the saved weights are what is shown.
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    drawn = draw_dataset_predictions(
        cfg, cfg.DATASETS.TEST[0], os.path.join(cfg.OUTPUT_DIR, "predictions"), num_drawn
    )
    return {
        "config": cfg.dump(),
        "metrics": {task: dict(values) for task, values in results.items()},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "checkpoint": cfg.MODEL.WEIGHTS,
        "drawn_predictions": drawn,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/main_job")
    parser.add_argument("--data-root", default="datasets", help="where synthetic data is written")
    parser.add_argument("--config-file", default=SHAPES_CONFIG)
    parser.add_argument("--num-drawn", type=int, default=8, help="validation images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()

    setup_logger(name="mrcnn_plugin")
    logger = setup_logger()
    torch.manual_seed(0)
    register_shapes(root=os.path.join(args.data_root, "shapes"))

    cfg = build_cfg(args.config_file, os.path.join(args.output_dir, "shapes"), args.opts)
    summary = {"shapes": train_and_evaluate(cfg, args.num_drawn)}

    os.makedirs(args.output_dir, exist_ok=True)
    summary_path = os.path.join(args.output_dir, "summary.json")
    with open(summary_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(summary_path + ".tmp", summary_path)

    for name, result in summary.items():
        metrics = result["metrics"]
        logger.info(
            "%s: bbox AP %.1f, segm AP %.1f (train %.0f s, eval %.0f s)",
            name,
            metrics["bbox"]["AP"],
            metrics["segm"]["AP"],
            result["train_seconds"],
            result["eval_seconds"],
        )
        logger.info(
            "%s: predictions drawn in %s", name, os.path.dirname(result["drawn_predictions"][0])
        )
    logger.info("summary: %s", summary_path)
    logging.shutdown()


if __name__ == "__main__":
    main()
