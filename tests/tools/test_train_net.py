"""tools/train_net.py end to end on a tiny model: 2 CPU processes (gloo + DDP), one process,
--eval-only, and strict weight loading for evaluation."""

import argparse
import json
import math
import os

import pytest
import torch
from tool_helpers import SHAPES_CONFIG, TINY_DATA_FLAGS, TINY_OPTS, run_tool

from mrcnn_plugin.checkpoint import CheckpointMismatchError
from mrcnn_plugin.cli.train_net import argument_parser, evaluate
from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.engine.launch import launch

MAX_ITER = 2  # SOLVER.MAX_ITER in TINY_OPTS
LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def _train_args(data_root, output_dir, *flags, opts=()):
    """tools/train_net.py's command line: flags, then the config overrides (``opts`` last)."""
    return [
        "tools/train_net.py",
        "--config-file", SHAPES_CONFIG,
        "--data-root", data_root,
        *TINY_DATA_FLAGS,
        *flags,
        *TINY_OPTS,
        "OUTPUT_DIR", str(output_dir),
        *opts,
    ]  # fmt: skip


def _read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_training_output(output_dir):
    """metrics.json holds the last iteration's finite losses and the final COCO evaluation;
    model_final.pth holds the last iteration and plain (unwrapped) parameter names."""
    records = _read_metrics(output_dir)
    train = [r for r in records if "total_loss" in r]
    assert train, records
    last = train[-1]
    assert last["iteration"] == MAX_ITER - 1
    for key in ("total_loss", *LOSSES):
        assert math.isfinite(last[key]) and last[key] > 0, (key, last)
    assert math.isclose(last["total_loss"], sum(last[k] for k in LOSSES), rel_tol=1e-4)
    evals = [r for r in records if "bbox/AP" in r]
    assert evals and "segm/AP" in evals[-1]

    checkpoint = torch.load(os.path.join(output_dir, "model_final.pth"), weights_only=False)
    assert checkpoint["iteration"] == MAX_ITER - 1
    names = list(checkpoint["model"])
    assert "roi_heads.mask_head.predictor.weight" in names
    assert not any(name.startswith("module.") for name in names)
    return evals[-1]


def test_two_cpu_processes_train_with_gloo(tmp_path, data_root):
    output_dir = tmp_path / "ddp"
    run_tool(_train_args(data_root, output_dir, "--num-gpus", "2", "--dist-url", "auto"))
    _check_training_output(output_dir)
    # Both processes joined one world of two (rank 1 logs to its own file).
    log = (output_dir / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "Rank of current process: 1. World size: 2" in (output_dir / "log.txt.rank1").read_text()


def test_train_then_eval_only(tmp_path, data_root):
    train_dir = tmp_path / "train"
    run_tool(_train_args(data_root, train_dir))
    final_eval = _check_training_output(train_dir)

    eval_dir = tmp_path / "eval"
    weights = str(train_dir / "model_final.pth")
    proc = run_tool(
        _train_args(data_root, eval_dir, "--eval-only", opts=["MODEL.WEIGHTS", weights])
    )
    assert "Evaluation results for bbox" in proc.stdout
    assert "Evaluation results for segm" in proc.stdout
    with open(eval_dir / "eval_results.json") as f:
        results = json.load(f)["results"]
    for task in ("bbox", "segm"):
        ap = results[task]["AP"]
        assert math.isfinite(ap) and 0.0 <= ap <= 100.0
        # The same weights on the same images: the evaluation at the end of training agrees.
        assert ap == pytest.approx(final_eval[f"{task}/AP"], abs=1e-6)

    # Evaluation refuses a checkpoint that does not fit the config instead of running with
    # random weights where it does not fit.
    opts = TINY_OPTS + ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.WEIGHTS", weights]
    cfg = build_cfg(SHAPES_CONFIG, opts)
    cfg.OUTPUT_DIR = str(tmp_path / "mismatch")
    args = argparse.Namespace(resume=False)
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.fpn_output2\.weight"):
        evaluate(cfg, args)


def test_parser_accepts_detectron2_flags_and_cpu_alias():
    args = argument_parser().parse_args(
        ["--config-file", "c.yaml", "--num-processes", "3", "--eval-only", "--resume",
         "--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://1.2.3.4:5",
         "SOLVER.MAX_ITER", "7"]
    )  # fmt: skip
    assert args.num_gpus == 3 and args.eval_only and args.resume
    assert (args.num_machines, args.machine_rank, args.dist_url) == (2, 1, "tcp://1.2.3.4:5")
    assert args.opts == ["SOLVER.MAX_ITER", "7"]
    assert argument_parser().parse_args(["--num-gpus", "2"]).num_gpus == 2
    assert argument_parser().parse_args([]).num_gpus == 1


def _probe(folder):
    """Runs in each launched process: records what detectron2's comm reports."""
    from detectron2.utils import comm

    info = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "gathered": comm.all_gather(comm.get_rank() * 10),
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(folder, f"rank{info['rank']}.json"), "w") as f:
        json.dump(info, f)


def test_cpu_launch_sets_up_detectron2_comm(tmp_path):
    launch(_probe, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, info in enumerate(infos):
        assert info["rank"] == info["local_rank"] == rank
        assert info["world_size"] == info["local_size"] == 2
        assert info["gathered"] == [0, 10]
        if "OMP_NUM_THREADS" not in os.environ:  # the cores are shared between the processes
            assert info["threads"] == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu(tmp_path, data_root):
    output_dir = tmp_path / "gpu"
    run_tool(_train_args(data_root, output_dir, opts=["MODEL.DEVICE", "cuda"]))
    _check_training_output(output_dir)
