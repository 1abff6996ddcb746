"""Shared settings of the tool tests: a tiny Mask R-CNN (R18-FPN, 32 channels, 64x64 images)
and a tiny synthetic data set, so that each subprocess training takes seconds.

Imported by the tests as ``tool_helpers`` (pytest puts this folder on sys.path).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
SHAPES_CONFIG = os.path.join(ROOT, "configs", "Synthetic", "mask_rcnn_R_18_FPN_shapes.yaml")

TINY_OPTS = [
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",  # GroupNorm(32) needs a multiple of 32
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.AMP.ENABLED", "False",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "MODEL.DEVICE", "cpu",
]  # fmt: skip

# 4 training and 2 validation images of 64x64 pixels.
TINY_DATA_FLAGS = [
    "--synthetic-num-train", "4",
    "--synthetic-num-val", "2",
    "--synthetic-image-size", "64",
]  # fmt: skip


def run_tool(args, timeout=300):
    """Runs ``python <args>`` in the repository root; returns the CompletedProcess (output in
    .stdout, stderr merged). Fails the test with the output's tail when the exit code is not 0."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [PYTHON, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc
