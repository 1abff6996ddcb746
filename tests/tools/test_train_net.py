"""tools/train_net.py end to end on a tiny model: 2 CPU processes (gloo + DDP), one process,
--eval-only, and strict weight loading for evaluation."""

import argparse
import json
import math
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from tool_helpers import SHAPES_CONFIG, TINY_DATA_FLAGS, TINY_OPTS, run_tool

from mrcnn_plugin.checkpoint import CheckpointMismatchError
from mrcnn_plugin.cli.train_net import argument_parser, evaluate, main
from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data.catalog import cfg_dataset_names, register_synthetic_datasets
from mrcnn_plugin.engine import trainer as trainer_module
from mrcnn_plugin.engine.cpu_autocast import CPUAutocastTrainer, cpu_has_bf16
from mrcnn_plugin.engine.cpu_features import CPUINFO_ENV
from mrcnn_plugin.engine.launch import launch
from mrcnn_plugin.engine.trainer import MRCNNTrainer

MAX_ITER = 2  # SOLVER.MAX_ITER in TINY_OPTS
TINY_SIZES = {"num_train": 4, "num_val": 2, "image_size": 64}  # as TINY_DATA_FLAGS
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


def test_train_then_eval_only(tmp_path, data_root, monkeypatch):
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

    # --mode quantized on a CPU that reports VNNI: an int8 backbone, calibrated on the first
    # training images, evaluated and recorded.
    cpuinfo = tmp_path / "cpuinfo_vnni"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: test CPU\nflags\t\t: avx2 avx512_vnni\n")
    monkeypatch.setenv(CPUINFO_ENV, str(cpuinfo))
    mode_dir = tmp_path / "eval_quantized"
    proc = run_tool(_train_args(data_root, mode_dir, "--eval-only", "--mode", "quantized",
                                opts=["MODEL.WEIGHTS", weights]))  # fmt: skip
    assert "Inference mode 'quantized' (requested 'quantized')" in proc.stdout
    with open(mode_dir / "eval_results.json") as f:
        record = json.load(f)
    assert record["inference_mode"]["mode"] == record["inference_mode"]["requested"] == "quantized"
    assert all(math.isfinite(record["results"][task]["AP"]) for task in ("bbox", "segm"))

    # Resuming restores the iteration and the optimizer's momentum, kept by MRCNNTrainer's
    # step runner (detectron2 v0.6's DefaultTrainer would not save the optimizer at all).
    cfg = build_cfg(SHAPES_CONFIG, TINY_OPTS + ["OUTPUT_DIR", str(train_dir)])
    register_synthetic_datasets(cfg, cfg_dataset_names(cfg), data_root, **TINY_SIZES)
    trainer = MRCNNTrainer(cfg)
    assert not trainer.optimizer.state_dict()["state"]
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == MAX_ITER
    assert trainer.optimizer.state_dict()["state"]

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


def test_mode_needs_eval_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config-file", SHAPES_CONFIG, "--mode", "fast"])
    assert exit_info.value.code == 2
    assert "--mode applies to --eval-only" in capsys.readouterr().err


# detectron2 main creates the per-machine group publicly; v0.6 has no public way to, and then
# comm.get_local_rank() is unavailable (nothing on the CPU path asks for it).
HAS_LOCAL_GROUP = hasattr(comm, "create_local_process_group")


def _probe(folder):
    """Runs in each launched process: records what detectron2's comm reports."""
    info = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank() if HAS_LOCAL_GROUP else comm.get_rank(),
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


def _killed_rank(folder):
    """Rank 1 dies at once (SIGKILL, no clean-up); rank 0 waits for it in a barrier."""
    if comm.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    comm.synchronize()
    open(os.path.join(folder, "rank0_passed_barrier"), "w").close()


def test_cpu_launch_fails_when_a_rank_is_killed(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        launch(_killed_rank, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    assert not (tmp_path / "rank0_passed_barrier").exists()


def test_cpu_has_bf16_reads_the_cpu_flags(tmp_path):
    cases = {
        "flags\t\t: fpu sse2 avx2 fma\n": False,  # AVX2 only: bf16 would be emulated
        "flags\t\t: avx2 avx512f avx512_bf16\n": True,
        "flags\t\t: avx2 amx_bf16 amx_tile\n": True,
        "Features\t: fp asimd bf16 i8mm\n": True,  # Arm
    }
    for text, expected in cases.items():
        (tmp_path / "cpuinfo").write_text("processor\t: 0\n" + text)
        assert cpu_has_bf16(str(tmp_path / "cpuinfo")) is expected, text
    assert cpu_has_bf16(str(tmp_path / "absent")) is False


class _TinyLossModel(torch.nn.Module):
    """Returns detectron2-style losses and records the dtype its layer computed in."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.dtypes = []

    def forward(self, batch):
        out = self.linear(batch)
        self.dtypes.append(out.dtype)
        return {"loss_a": out.square().mean(), "loss_b": out.abs().mean()}


def test_cpu_autocast_trainer_steps_in_bfloat16():
    torch.manual_seed(0)
    model = _TinyLossModel()
    before = model.linear.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = CPUAutocastTrainer(model, [torch.randn(3, 4) for _ in range(3)], optimizer)
    runner.train(0, 3)
    assert model.dtypes == [torch.bfloat16] * 3
    assert not torch.equal(model.linear.weight, before)  # the optimizer stepped
    assert model.linear.weight.dtype == torch.float32  # autocast leaves the weights alone
    history = runner.storage.history("total_loss").values()
    assert len(history) == 3 and all(math.isfinite(v) for v, _ in history)
    assert {"loss_a", "loss_b", "data_time"} <= set(runner.storage.histories())
    state = runner.state_dict()
    assert state["iteration"] == 3 and state["optimizer"]["state"]  # momentum buffers saved


@pytest.mark.parametrize("amp, bf16, expected", [
    (False, True, SimpleTrainer),
    (True, False, SimpleTrainer),  # no bfloat16 units: float32
    (True, True, CPUAutocastTrainer),
])  # fmt: skip
def test_step_runner_on_the_cpu(monkeypatch, amp, bf16, expected):
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: bf16)
    cfg = build_cfg(SHAPES_CONFIG, TINY_OPTS + ["SOLVER.AMP.ENABLED", str(amp)])
    model = _TinyLossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = MRCNNTrainer.build_step_runner(cfg, model, [], optimizer)
    assert type(runner) is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu(tmp_path, data_root):
    output_dir = tmp_path / "gpu"
    run_tool(_train_args(data_root, output_dir, opts=["MODEL.DEVICE", "cuda"]))
    _check_training_output(output_dir)
