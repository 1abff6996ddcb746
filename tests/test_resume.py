"""Resume is exact on the CPU: a real ``mrcnn-train`` killed with SIGKILL and resumed with
``--resume`` ends bit-identical to an uninterrupted run (weights, optimizer state, LR scheduler,
random states), and the resumed run trains on the batches the uninterrupted one trained on.

Conditions (MRCNNTrainer's docstring): one process, DATALOADER.NUM_WORKERS 0, a fixed thread
count (OMP_NUM_THREADS=1 here), SEED fixed; the synthetic images are all square.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
from tool_helpers import SHAPES_CONFIG, TINY_DATA_FLAGS, TINY_OPTS  # noqa: E402

from mrcnn_plugin.checkpoint import read_checkpoint  # noqa: E402

MRCNN_TRAIN = os.path.join(os.path.dirname(sys.executable), "mrcnn-train")
MAX_ITER = 12
KILL_AFTER = 5  # kill once last_checkpoint names an iteration >= this one
OPTS = [
    *TINY_OPTS,
    "SOLVER.MAX_ITER", str(MAX_ITER),
    "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.STEPS", "(8,)",  # the LR changes after the kill: the scheduler must be restored
    "SOLVER.CHECKPOINT_PERIOD", "1",
    "SEED", "7",
    "DATASETS.TEST", "()",
]  # fmt: skip


def _command(data_root, output_dir, *flags):
    return [
        MRCNN_TRAIN, "--config-file", SHAPES_CONFIG, "--data-root", data_root,
        *TINY_DATA_FLAGS, *flags, *OPTS, "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(command):
    proc = subprocess.run(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc


def _last_iteration(output_dir) -> int:
    """The iteration of the checkpoint ``last_checkpoint`` names, -1 when there is none."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return -1
    if name == "model_final.pth":
        return MAX_ITER - 1
    return int(name[len("model_") : -len(".pth")])


def _flatten(data, prefix=""):
    """name -> value of every leaf of nested dicts / lists / tuples."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return {prefix: data}
    out = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@pytest.mark.skipif(not os.path.exists(MRCNN_TRAIN), reason="mrcnn-train is not installed")
def test_resume_after_kill_is_bit_identical(tmp_path):
    data_root = str(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(data_root, straight))  # also generates the synthetic data once

    proc = subprocess.Popen(
        _command(data_root, killed),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while _last_iteration(killed) < KILL_AFTER and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = _last_iteration(killed)
    assert KILL_AFTER <= stopped_at < MAX_ITER - 1

    log = _run(_command(data_root, killed, "--resume")).stdout
    assert f"Starting training from iteration {stopped_at + 1}" in log

    expected = _flatten(read_checkpoint(str(straight / "model_final.pth")))
    resumed = _flatten(read_checkpoint(str(killed / "model_final.pth")))
    assert expected.keys() == resumed.keys()
    assert expected["trainer.iteration"] == MAX_ITER - 1
    assert any(key.startswith("trainer.step_runner.optimizer.state") for key in expected)
    assert any(key.startswith("trainer.hooks.LRScheduler.") for key in expected)
    differences = {}
    for key, value in expected.items():
        other = resumed[key]
        if isinstance(value, torch.Tensor):
            if not torch.equal(value, other):
                differences[key] = (value.double() - other.double()).abs().max().item()
        elif value != other:
            differences[key] = (value, other)
    assert not differences, differences
