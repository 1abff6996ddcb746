"""Train or evaluate the plugin's Mask R-CNN, with detectron2's ``tools/train_net.py`` flags.

    mrcnn-train --config-file configs/Synthetic/mask_rcnn_R_18_FPN_shapes.yaml
    mrcnn-train --config-file CFG --num-gpus 8                     # 8 GPUs (NCCL)
    mrcnn-train --config-file CFG --num-gpus 2 MODEL.DEVICE cpu    # 2 CPU processes (gloo)
    mrcnn-train --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth
    mrcnn-train --config-file CFG --eval-only --mode quantized MODEL.WEIGHTS out/model_final.pth

On a machine without CUDA, or with MODEL.DEVICE "cpu", ``--num-gpus N`` (alias
``--num-processes N``) starts N CPU processes that train one model with DistributedDataParallel
over gloo; SOLVER.IMS_PER_BATCH is the total over all processes, as on GPUs.

Output in OUTPUT_DIR comes from DefaultTrainer: checkpoints (model_final.pth), metrics.json (one
JSON object per line), TensorBoard events and the COCO evaluation of DATASETS.TEST at the end.
``--eval-only`` also writes eval_results.json there; with ``--mode`` it evaluates the model in
that CPU inference mode (MODEL.MRCNN.INFERENCE_MODE; quantized calibrates on the first images of
DATASETS.TRAIN), else as detectron2 builds it. Synthetic data sets named in DATASETS
(mrcnn_shapes_*, mrcnn_persons_*) are generated under --data-root and registered.

The checkpoint a run loads (the last one in OUTPUT_DIR with --resume, else MODEL.WEIGHTS) is
read first without running code from it (:func:`mrcnn_plugin.checkpoint.read_checkpoint`):
detectron2's checkpointer, which then loads it for training, unpickles ``.pkl`` files with
``pickle.load``. A config, override or file that cannot be used ends the tool with one line,
``mrcnn-train: error: ...``, and exit status 2.
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import load_checkpoint, read_checkpoint
from ..config import build_cfg
from ..data.catalog import cfg_dataset_names, register_synthetic_datasets
from ..engine.inference_modes import INFERENCE_MODES
from ..engine.launch import launch
from ..engine.mode_evaluation import evaluate_in_mode
from ..engine.trainer import MRCNNTrainer
from .common import add_synthetic_arguments, reports_bad_input, synthetic_sizes

logger = logging.getLogger("mrcnn_plugin.train_net")


def argument_parser():
    """detectron2's ``default_argument_parser()`` plus --num-processes and the synthetic-data
    flags. Trailing ``KEY VALUE`` pairs override the config."""
    parser = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1])
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument(
        "--num-processes",
        dest="num_gpus",
        type=int,
        default=argparse.SUPPRESS,
        help="alias of --num-gpus; on the CPU the number of training processes per machine",
    )
    parser.add_argument(
        "--mode",
        choices=INFERENCE_MODES,
        default=None,
        help="with --eval-only: the CPU inference mode to evaluate in (sets "
        "MODEL.MRCNN.INFERENCE_MODE); a CPU without its units falls back with one log line",
    )
    add_synthetic_arguments(parser)
    return parser


def _checked_args(parser, argv):
    args = parser.parse_args(argv)
    if args.mode is not None and not args.eval_only:
        parser.error("--mode applies to --eval-only (training always runs the model as built)")
    if args.mode is not None:
        args.opts = list(args.opts) + ["MODEL.MRCNN.INFERENCE_MODE", args.mode]
    return args


def setup(args):
    """get_cfg -> add_mrcnn_config -> merge file -> merge opts -> freeze -> default_setup."""
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; the plugin logs too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mrcnn_plugin")
    return cfg


def weights_to_load(cfg, resume: bool) -> str:
    """The checkpoint a run loads (as ``DefaultTrainer.resume_or_load``; --eval-only too): the
    last one in OUTPUT_DIR with --resume (when it exists), else MODEL.WEIGHTS ("" for none)."""
    checkpointer = DetectionCheckpointer(None, save_dir=cfg.OUTPUT_DIR)
    if resume and checkpointer.has_checkpoint():
        return checkpointer.get_checkpoint_file()
    return cfg.MODEL.WEIGHTS


def evaluate(cfg, args):
    """Builds the model, loads its weights strictly (a checkpoint that does not fit raises)
    and runs ``MRCNNTrainer.test`` on DATASETS.TEST, in inference mode ``args.mode`` when set;
    returns {task: {metric: value}}."""
    model = MRCNNTrainer.build_model(cfg)
    weights = weights_to_load(cfg, args.resume)
    if weights:
        load_checkpoint(model, weights)
    else:
        logger.warning("--eval-only without MODEL.WEIGHTS: evaluating randomly initialised weights")
    record = {"weights": weights}
    if getattr(args, "mode", None):
        run_in_mode = evaluate_in_mode(cfg, model, args.mode)
        results = run_in_mode.pop("results")
        record["inference_mode"] = run_in_mode
    else:
        results = MRCNNTrainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
        path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
        with open(path, "w") as f:
            json.dump({**record, "results": results}, f, indent=2)
        logger.info("Evaluation results written to %s", path)
    return results


def run(args):
    """The per-process body (detectron2's ``main(args)``): train, or evaluate with --eval-only."""
    cfg = setup(args)
    register_synthetic_datasets(
        cfg, cfg_dataset_names(cfg), args.data_root, **synthetic_sizes(args)
    )
    if args.eval_only:
        return evaluate(cfg, args)
    trainer = MRCNNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


@reports_bad_input("mrcnn-train")
def main(argv: Optional[List[str]] = None):
    """Console entry point: parses ``argv`` (default: sys.argv[1:]) and launches ``run`` in
    --num-gpus processes per machine."""
    args = _checked_args(argument_parser(), sys.argv[1:] if argv is None else argv)
    print("Command Line Args:", args)
    cfg = build_cfg(args.config_file, args.opts)
    weights = weights_to_load(cfg, args.resume)
    if weights:
        read_checkpoint(weights)  # refuses a file that would run code, before any process starts
    if args.num_gpus * args.num_machines > 1:
        # Generate the synthetic data once, here, so that the processes only read it.
        setup_logger(name="mrcnn_plugin")
        register_synthetic_datasets(
            cfg, cfg_dataset_names(cfg), args.data_root, **synthetic_sizes(args)
        )
    device = "cpu" if cfg.MODEL.DEVICE == "cpu" else None
    # Nothing is returned: a console script exits with main()'s value (results read as failure).
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )
