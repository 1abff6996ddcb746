"""Multi-process launch that also works without CUDA.

GPU jobs go to detectron2's ``launch`` unchanged. CPU jobs are spawned here, one gloo process
per requested "GPU": detectron2 v0.6's ``launch`` asserts CUDA for more than one process, and
main's picks NCCL whenever a GPU is visible, even for a CPU model.

detectron2's per-machine process group (behind ``comm.get_local_rank()``) is created with the
public ``comm.create_local_process_group`` where detectron2 has it (main). v0.6 has no public
way to create it; there only ``create_ddp_model`` asks for the local rank, and CPU training
(``MRCNNTrainer``) passes ``device_ids=None`` so it never does.
"""

import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch"]

logger = logging.getLogger(__name__)


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
    world_size = num_machines * num_processes_per_machine
    if device != "cpu" or world_size <= 1:
        return d2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=tuple(args),
            timeout=timeout,
        )

    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("dist_url 'auto' only works on one machine; pass tcp://HOST:PORT")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # a port that is free now
            dist_url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    # Share the cores between the processes instead of letting each one use all of them.
    threads = max(1, (os.cpu_count() or 1) // num_processes_per_machine)
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, num_machines, num_processes_per_machine, machine_rank, dist_url,
              tuple(args), timeout, threads),
        daemon=False,
    )  # fmt: skip


def _cpu_worker(
    local_rank, main_func, num_machines, per_machine, machine_rank, dist_url, args, timeout, threads
):
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=num_machines * per_machine,
            rank=machine_rank * per_machine + local_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Could not join the process group at %s", dist_url)
        raise
    create_local_process_group = getattr(comm, "create_local_process_group", None)
    if create_local_process_group is not None:  # detectron2 main; collective, like new_group
        create_local_process_group(per_machine)
    comm.synchronize()
    main_func(*args)
    # On failure mp.spawn ends the other processes; on success leave the group together.
    comm.synchronize()
    dist.destroy_process_group()
    # gloo's background threads can still be joinable when the interpreter tears down, which
    # aborts the process ("terminate called without an active exception", seen once in a
    # fresh-clone suite run) after the work is done. The work and the group are finished:
    # flush and leave without the interpreter's teardown, so mp.spawn sees exit code 0.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
