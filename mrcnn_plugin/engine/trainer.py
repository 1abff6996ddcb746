"""The plugin's trainer: detectron2's DefaultTrainer with COCO evaluation and CPU training."""

import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.train_loader import build_validated_train_loader
from .checkpointer import SafeCheckpointer
from .cpu_autocast import CPUAutocastTrainer, cpu_has_bf16
from .finite_step import check_finite_gradients
from .resume import ResumableLoader, ResumableSampler, load_rng_state, rng_state

logger = logging.getLogger(__name__)


def _step_runner_attribute(name: str) -> property:
    """DefaultTrainer's ``model`` / ``data_loader`` / ``optimizer``, read from ``step_runner``."""
    return property(
        lambda self: getattr(self.step_runner, name),
        lambda self, value: setattr(self.step_runner, name, value),
    )


class MRCNNTrainer(DefaultTrainer):
    """DefaultTrainer that evaluates with COCOEvaluator and trains on CPUs too: there the
    model is kept channels-last, several processes train it with DistributedDataParallel over
    gloo, and SOLVER.AMP.ENABLED means bfloat16 autocast where the CPU has bfloat16 units.

    DefaultTrainer.__init__ wraps the model with ``create_ddp_model``, which passes
    ``device_ids=[local_rank]``: DistributedDataParallel refuses that for a CPU model. So
    ``__init__`` does the same wiring with DefaultTrainer's public builders, and the object
    that runs one step is ``step_runner`` (see ``build_step_runner``).

    Training stops before an optimizer step with non-finite gradients (``finite_step``);
    checkpoints are atomic and never hold NaN/Inf (``SafeCheckpointer``); a resumed run goes on
    with the saved random states and data position (``resume``: bit-identical on the CPU with
    one process and DATALOADER.NUM_WORKERS 0).
    """

    model = _step_runner_attribute("model")
    data_loader = _step_runner_attribute("data_loader")
    optimizer = _step_runner_attribute("optimizer")

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer: its progress would go unseen otherwise
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        # Built in DefaultTrainer's order (the optimizer before the data loader).
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        check_finite_gradients(optimizer, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        self.step_runner = self.build_step_runner(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_step_runner(cls, cfg, model, data_loader, optimizer) -> TrainerBase:
        """The trainer whose ``run_step`` does one iteration: AMPTrainer for AMP on CUDA,
        CPUAutocastTrainer for AMP on a CPU with bfloat16 units, else SimpleTrainer."""
        if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
            if cpu_has_bf16():
                return CPUAutocastTrainer(model, data_loader, optimizer)
            logger.info("SOLVER.AMP: this CPU has no bfloat16 units; training in float32")
        elif cfg.SOLVER.AMP.ENABLED:
            return AMPTrainer(model, data_loader, optimizer)
        return SimpleTrainer(model, data_loader, optimizer)

    def run_step(self):
        self.step_runner.iter = self.iter
        self.step_runner.run_step()

    def state_dict(self):
        state = {**TrainerBase.state_dict(self), "step_runner": self.step_runner.state_dict()}
        # The scheduler directly too: the LRScheduler hook saves only _LRScheduler subclasses,
        # which torch 2.x's own schedulers are not. Only the main process saves: its random
        # states are those of a one-process run.
        return {**state, "scheduler": self.scheduler.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        if "step_runner" in state_dict:  # absent from checkpoints of other trainers
            self.step_runner.load_state_dict(state_dict["step_runner"])
        if "scheduler" in state_dict:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        if isinstance(self.data_loader, ResumableLoader):
            # The checkpoint is taken after its iteration: resume with the next batch.
            self.data_loader.start_at(self.iter + 1)
        if "rng" in state_dict and comm.get_world_size() == 1:
            load_rng_state(state_dict["rng"])
        elif "rng" in state_dict:
            logger.info(
                "Resuming %d processes: each keeps its fresh random state", comm.get_world_size()
            )

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.DEVICE == "cpu":
            # oneDNN's convolution backward is several times faster in channels-last layout
            # (measured 7 s -> 1.1 s per step for the synthetic R18-FPN config on 2 cores).
            model = model.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader over checked records: a bad image or annotation is named
        (file and field), or skipped and counted with DATALOADER.MRCNN.SKIP_BAD_RECORDS. It is
        a ResumableLoader: a resumed run goes on with the batch after the checkpoint's."""
        samplers = []

        def resumable(sampler):
            samplers.append(ResumableSampler(sampler))
            return samplers[-1]

        loader = build_validated_train_loader(cfg, wrap_sampler=resumable)
        return ResumableLoader(
            loader, samplers[0], cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        metadata = MetadataCatalog.get(dataset_name)
        # OKS sigmas: the config's if set, else the data set's own (synthetic persons carry them).
        sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS or metadata.get("keypoint_oks_sigmas", ())
        return COCOEvaluator(dataset_name, output_dir=output_folder, kpt_oks_sigmas=tuple(sigmas))
