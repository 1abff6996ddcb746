"""No poisoned or broken checkpoint: a non-finite gradient stops the step before the weights
change, a checkpoint with NaN/Inf is never written, and a process killed with SIGKILL at any
moment of a save leaves ``last_checkpoint`` naming a complete, finite, weights-only loadable
checkpoint (saves over an existing name included)."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from detectron2.utils.events import EventStorage

from mrcnn_plugin.checkpoint import read_checkpoint
from mrcnn_plugin.engine.checkpointer import (
    NonFiniteCheckpointError,
    SafeCheckpointer,
    non_finite_tensors,
)
from mrcnn_plugin.engine.finite_step import NonFiniteGradientError, check_finite_gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
from tool_helpers import SHAPES_CONFIG, TINY_DATA_FLAGS, TINY_OPTS  # noqa: E402

MRCNN_TRAIN = os.path.join(os.path.dirname(sys.executable), "mrcnn-train")
TINY_SIZES = {"num_train": 4, "num_val": 2, "image_size": 64}  # as TINY_DATA_FLAGS


def _tiny_trainer(output_dir, data_root, *opts):
    from mrcnn_plugin.config import build_cfg
    from mrcnn_plugin.data.catalog import cfg_dataset_names, register_synthetic_datasets
    from mrcnn_plugin.engine.trainer import MRCNNTrainer

    cfg = build_cfg(SHAPES_CONFIG, [*TINY_OPTS, "OUTPUT_DIR", str(output_dir), *opts])
    register_synthetic_datasets(cfg, cfg_dataset_names(cfg), str(data_root), **TINY_SIZES)
    return MRCNNTrainer(cfg)


def _check_last_checkpoint(folder):
    """``last_checkpoint`` names a file that loads weights-only, is complete and finite."""
    with open(os.path.join(folder, "last_checkpoint")) as f:
        name = f.read()
    assert name.endswith(".pth"), repr(name)
    checkpoint = read_checkpoint(os.path.join(folder, name))
    assert {"model", "trainer", "iteration"} <= checkpoint.keys(), (name, list(checkpoint))
    assert not non_finite_tensors(checkpoint), name
    return name, checkpoint


def test_non_finite_gradient_stops_the_step_before_the_weights_change():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    check_finite_gradients(optimizer, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = float("inf")
    with EventStorage(start_iter=17) as storage:
        storage.put_scalar("total_loss", 1.5)
        storage.put_scalar("loss_cls", 0.25)
        with pytest.raises(NonFiniteGradientError, match=r"iteration 17.*loss_cls=0\.25.*\bbias"):
            optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not optimizer.state  # no momentum was recorded either


def test_diverging_training_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    trainer = _tiny_trainer(
        tmp_path / "out", tmp_path / "data",
        "SOLVER.BASE_LR", "1000.0", "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "1",
        "DATASETS.TEST", "()",
    )  # fmt: skip
    trainer.resume_or_load(resume=False)
    # Stopped by the gradient check, detectron2's loss check, or its RPN's check of the boxes.
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    # The step that failed changed no weight: the model is finite, and so is every checkpoint.
    assert not non_finite_tensors(trainer.model.state_dict()), error.value
    name, _ = _check_last_checkpoint(tmp_path / "out")
    for file in os.listdir(tmp_path / "out"):
        if file.endswith(".pth"):
            assert not non_finite_tensors(read_checkpoint(str(tmp_path / "out" / file))), file


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_good")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"model_bad.*weight"):
        checkpointer.save("model_bad")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_good.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_good.pth"


# Builds a tiny MRCNNTrainer once; then, per line on stdin, forks a child that saves with the
# trainer's checkpointer forever (model_final.pth over itself, model_000000{0,1,2}.pth), each
# save with other weights; prints the child's pid and, once the parent killed it, "reaped".
SAVE_LOOP = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint_kills import _tiny_trainer
trainer = _tiny_trainer({out!r}, {data!r}, "SOLVER.CHECKPOINT_PERIOD", "1")
trainer.checkpointer.save("model_final", iteration=0)
print("@ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        i = 0
        while True:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(0.001)
            trainer.iter = i
            name = "model_final" if i % 2 == 0 else "model_{{:07d}}".format(i % 3)
            trainer.checkpointer.save(name, iteration=i)
            i += 1
    print("@", pid, flush=True)
    os.waitpid(pid, 0)
    print("@reaped", flush=True)
"""


def _read_reply(stream) -> str:
    """The next line of the save loop's protocol (lines starting with "@"; logs are skipped)."""
    for line in stream:
        if line.startswith("@"):
            return line[1:].strip()
    raise EOFError("the save loop ended")


def _count_temporaries(folder):
    return sum(name.startswith(".") and name.endswith(".tmp") for name in os.listdir(folder))


def test_sigkill_during_saves_leaves_a_loadable_last_checkpoint(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    script = SAVE_LOOP.format(tests=os.path.dirname(__file__), out=str(out), data=str(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    server = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    rng = random.Random(0)
    names, mid_write = set(), 0
    try:
        assert _read_reply(server.stdout) == "ready"
        for _ in range(20):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(_read_reply(server.stdout))
            time.sleep(rng.uniform(0.2, 2.0))
            os.kill(pid, signal.SIGKILL)
            assert _read_reply(server.stdout) == "reaped"
            mid_write += _count_temporaries(out) > 0
            name, checkpoint = _check_last_checkpoint(out)
            names.add(name)
    finally:
        server.kill()
        server.wait()
    assert len(names) > 1, names  # the children saved, and the kills fell at different moments
    print(f"20 kills of a save loop: {mid_write} during a write, all left a loadable checkpoint")


@pytest.mark.skipif(not os.path.exists(MRCNN_TRAIN), reason="mrcnn-train is not installed")
def test_sigkill_of_mrcnn_train_leaves_a_loadable_last_checkpoint(tmp_path):
    """mrcnn-train with a checkpoint every iteration, run to its end, then resumed with more
    iterations and killed at a random moment, 3 times."""
    out, data = tmp_path / "out", str(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    rng = random.Random(1)
    base = [MRCNN_TRAIN, "--config-file", SHAPES_CONFIG, "--data-root", data, *TINY_DATA_FLAGS]
    opts = [*TINY_OPTS, "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(out)]  # fmt: skip
    first = subprocess.run(
        [*base, *opts, "SOLVER.MAX_ITER", "3"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _check_last_checkpoint(out)[0] == "model_final.pth"
    for attempt in range(3):
        max_iter = 3 + 20 * (attempt + 1)
        proc = subprocess.Popen(
            [*base, "--resume", *opts, "SOLVER.MAX_ITER", str(max_iter)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started = os.path.getmtime(out / "last_checkpoint")
        while os.path.getmtime(out / "last_checkpoint") == started and proc.poll() is None:
            time.sleep(0.05)  # wait for its first save, then kill at a random moment
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check_last_checkpoint(out)
