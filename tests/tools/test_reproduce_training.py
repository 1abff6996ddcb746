"""Every CPU counterpart of a Table 2 / Table 6 config (configs/Reproduce/) trains a few steps
with the synthetic configs' defaults, SOLVER.AMP.ENABLED: bfloat16 autocast (forced here through
MRCNN_PLUGIN_CPUINFO, so that a CPU without bfloat16 units, where the trainer would fall back to
float32, runs the autocast path too), and, for each distinct RoI op and mask/keypoint head, in
float32."""

import math

import pytest

from mrcnn_plugin.data.catalog import register_synthetic_datasets
from mrcnn_plugin.engine import MRCNNTrainer
from mrcnn_plugin.engine.cpu_autocast import CPUAutocastTrainer
from mrcnn_plugin.engine.cpu_features import CPUINFO_ENV
from mrcnn_plugin.reproduce.runner import build_run_cfg
from mrcnn_plugin.reproduce.variants import SCHEDULES, VARIANTS

# float32 as well for these: RoIPool, RoIWarp and max RoIAlign (average RoIAlign and the FCN
# head are in every other test's float32 training), the MLP, softmax and keypoint heads.
FLOAT32_TOO = {"c4_roipool", "c4_roiwarp_max", "c4_roialign_max", "c4_softmax", "fpn_mlp2",
               "kp_roipool"}  # fmt: skip
CASES = [(key, "bf16") for key in VARIANTS] + [(key, "float32") for key in sorted(FLOAT32_TOO)]


@pytest.mark.parametrize("key,precision", CASES)
def test_config_trains_a_few_steps(key, precision, tmp_path, data_root, monkeypatch):
    schedule = SCHEDULES["smoke"]
    opts = ["SOLVER.MAX_ITER", "2"]
    if precision == "float32":
        opts += ["SOLVER.AMP.ENABLED", "False"]
    else:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n")
        monkeypatch.setenv(CPUINFO_ENV, str(cpuinfo))
    cfg = build_run_cfg(VARIANTS[key], 0, schedule, str(tmp_path), opts)
    assert cfg.SOLVER.AMP.ENABLED == (precision == "bf16")
    register_synthetic_datasets(
        cfg, list(cfg.DATASETS.TRAIN), f"{data_root}/reproduce_smoke",
        num_train=schedule.num_train, num_val=schedule.num_val,
    )  # fmt: skip
    trainer = MRCNNTrainer(cfg)
    assert isinstance(trainer.step_runner, CPUAutocastTrainer) == (precision == "bf16")
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    assert len(history["total_loss"].values()) == 2  # both iterations ran
    losses = [name for name in history if name.startswith("loss_")]
    expected = {"loss_mask"} if cfg.MODEL.MASK_ON else {"loss_keypoint"}
    assert expected <= set(losses), losses
    for name in losses + ["total_loss"]:
        assert math.isfinite(history[name].latest()), name
