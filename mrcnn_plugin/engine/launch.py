"""Multi-process launch that also works without CUDA.

detectron2 v0.6's ``launch`` insists on CUDA and NCCL as soon as more than one process is asked
for. ``launch`` here hands GPU jobs to it unchanged and runs CPU jobs itself: one process per
requested "GPU", joined by a gloo process group, with detectron2's per-machine process group
(``comm._LOCAL_PROCESS_GROUP``) set up the same way so ``comm.get_local_rank()`` works.

``ddp_on_cpu()`` fixes the second CUDA assumption: detectron2's ``create_ddp_model`` passes
``device_ids=[local_rank]``, which DistributedDataParallel rejects for a model on the CPU.
"""

import contextlib
import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "ddp_on_cpu", "free_localhost_url"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def free_localhost_url() -> str:
    """A ``tcp://127.0.0.1:PORT`` URL with a port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: Optional[str] = None,
):
    """Runs ``main_func(*args)`` in ``num_processes_per_machine`` processes on this machine.

    Must be called on every machine of the job. A world of one process runs ``main_func`` in
    the calling process.

    Args:
        num_processes_per_machine: GPUs per machine on CUDA, processes per machine on the CPU.
        dist_url: ``init_method`` of ``torch.distributed``, e.g. "tcp://10.0.0.1:29500";
            "auto" (or None on one machine) picks a free localhost port.
        device: "cuda" delegates to detectron2's launch (NCCL), "cpu" spawns CPU processes
            (gloo); None picks "cuda" when CUDA is available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        return d2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=tuple(args),
            timeout=timeout,
        )

    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("dist_url 'auto' only works on one machine; pass tcp://HOST:PORT")
        dist_url = free_localhost_url()
    # Share the cores between the processes instead of letting each one use all of them.
    threads = max(1, (os.cpu_count() or 1) // num_processes_per_machine)
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            num_machines,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            tuple(args),
            timeout,
            threads,
        ),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, num_machines, per_machine, machine_rank, dist_url, args, timeout, threads
):
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    world_size = num_machines * per_machine
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=machine_rank * per_machine + local_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Could not join the process group at %s", dist_url)
        raise
    # new_group() is collective: every process creates every machine's group, and keeps its own.
    assert comm._LOCAL_PROCESS_GROUP is None
    for machine in range(num_machines):
        ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    # On failure mp.spawn ends the other processes; on success leave the group together.
    comm.synchronize()
    dist.destroy_process_group()


@contextlib.contextmanager
def ddp_on_cpu():
    """Within the block, detectron2's ``create_ddp_model`` wraps CPU models without
    ``device_ids`` (DistributedDataParallel accepts none for CPU modules). GPU models and
    single-process runs are unaffected. Use it around ``DefaultTrainer(cfg)``."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and comm.get_world_size() > 1:
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original
