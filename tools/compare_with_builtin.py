#!/usr/bin/env python
"""Trains the plugin's Mask R-CNN and detectron2's built-in one with the same config, data,
schedule and seed, and prints both APs side by side.

    python tools/compare_with_builtin.py --output-dir output/compare [KEY VALUE ...]

The built-in model is the same config with detectron2's component names swapped in
(``mrcnn_plugin.benchmark.use_builtin_components``); the architectures are the same, so the
two APs should agree within run-to-run noise.
"""

import argparse
import json
import os
import time

import torch
from detectron2.utils.logger import setup_logger

from mrcnn_plugin.benchmark import use_builtin_components
from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data.catalog import DEFAULT_DATA_ROOT, register_synthetic_datasets
from mrcnn_plugin.engine import MRCNNTrainer

SHAPES_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs/Synthetic/mask_rcnn_R_18_FPN_shapes.yaml",
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/compare")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--config-file", default=SHAPES_CONFIG)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    logger = setup_logger()

    rows = {}
    for name in ("plugin", "detectron2"):
        torch.manual_seed(0)
        cfg = build_cfg(args.config_file, args.opts)
        if name == "detectron2":
            use_builtin_components(cfg)
        cfg.OUTPUT_DIR = os.path.join(args.output_dir, name)
        cfg.freeze()
        register_synthetic_datasets(cfg, cfg.DATASETS.TRAIN + cfg.DATASETS.TEST, args.data_root)
        start = time.perf_counter()
        trainer = MRCNNTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        train_seconds = time.perf_counter() - start
        results = MRCNNTrainer.test(cfg, trainer.model)
        rows[name] = {task: values["AP"] for task, values in results.items()}
        rows[name]["train_seconds"] = round(train_seconds, 1)

    tasks = [t for t in rows["plugin"] if t != "train_seconds"]
    logger.info("model       " + "".join(f"{t + ' AP':>12}" for t in tasks) + "     train s")
    for name, row in rows.items():
        aps = "".join(f"{row[t]:12.2f}" for t in tasks)
        logger.info(f"{name:<12}{aps}{row['train_seconds']:12.0f}")
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
