"""A short CPU training run of the main job's Mask R-CNN must clear an AP floor.

The floors were set from measured runs of exactly this test (see the numbers below); they
catch a model, loss, data or evaluation change that stops the model from learning.
"""

import os

import torch

from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data import register_shapes
from mrcnn_plugin.engine import MRCNNTrainer

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(__file__)),
    "configs",
    "Synthetic",
    "mask_rcnn_R_18_FPN_shapes.yaml",
)
ITERATIONS = 300
# Measured with this exact test on the 2-core machine (2026-11-21): bbox AP 17.7, segm AP 14.5
# (an untrained model scores about 0). The floors are half of that, to absorb run-to-run noise.
BBOX_AP_FLOOR = 9.0
SEGM_AP_FLOOR = 7.0


def test_short_training_clears_the_ap_floor(tmp_path):
    train, val = register_shapes(
        root=str(tmp_path / "shapes"), seed=1, num_train=400, num_val=50, prefix="mrcnn_shapes_ci"
    )
    torch.manual_seed(0)
    cfg = build_cfg(CONFIG, [
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
        "SOLVER.MAX_ITER", str(ITERATIONS), "SOLVER.STEPS", f"({ITERATIONS * 3 // 4},)",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])  # fmt: skip
    cfg.freeze()
    trainer = MRCNNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = MRCNNTrainer.test(cfg, trainer.model)
    print("AP:", {task: round(values["AP"], 2) for task, values in results.items()}, flush=True)
    assert results["bbox"]["AP"] >= BBOX_AP_FLOOR
    assert results["segm"]["AP"] >= SEGM_AP_FLOOR
