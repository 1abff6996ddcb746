"""Trains and evaluates the reproduction's runs (variant x seed), one after the other or
``jobs`` at a time in worker processes, writing ``results.json`` after each, so that an
interrupted reproduction resumes where it stopped.

``results.json``: {"runs": {"<schedule>/<variant>/seed<k>": {"metrics": {"segm/AP": ...},
"train_seconds": ..., "eval_seconds": ..., "config": ..., "builtin": ...}}, "machine": ...}.
A run's detectron2 log and COCO evaluation files are under ``runs/<schedule>/<variant>_s<k>/``.
"""

import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.utils.env import seed_all_rng

from ..benchmark import use_builtin_components
from ..config import build_cfg
from ..data.catalog import register_synthetic_datasets
from ..engine import MRCNNTrainer
from ..engine.cpu_features import cpu_has_bf16
from .variants import Schedule, Variant

logger = logging.getLogger(__name__)
RESULTS_NAME = "results.json"


class ResultsFileError(ValueError):
    """results.json cannot be read; the message names the file."""


def run_key(schedule: Schedule, variant: Variant, seed: int) -> str:
    return f"{schedule.name}/{variant.key}/seed{seed}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_autocast": cpu_has_bf16(),
        "torch": torch.__version__,
    }


def load_results(output_dir: str) -> dict:
    """The results written so far ({"runs": {}} when none). A file that is not valid JSON is an
    error naming it: resuming over it would silently retrain everything."""
    path = os.path.join(output_dir, RESULTS_NAME)
    if not os.path.exists(path):
        return {"runs": {}}
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not valid JSON ({e}); move it away to start over") from e
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ResultsFileError(f"{path}: field 'runs' must be an object")
    return data


def save_result(output_dir: str, key: str, result: dict, machine: dict) -> None:
    """Adds one run's result to results.json.

    Re-read under an exclusive lock and merged, so several ``mrcnn-reproduce`` processes can
    share one output folder (e.g. ``--seeds 0,`` and ``--seeds 1,`` on two cores) without one
    overwriting the other's results. Written to a temporary file and renamed: never truncated,
    even when killed mid-write.
    """
    path = os.path.join(output_dir, RESULTS_NAME)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_results(output_dir)
        data.setdefault("machine", machine)
        data["runs"][key] = result
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def build_run_cfg(
    variant: Variant, seed: int, schedule: Schedule, output_dir: str, opts: Sequence[str] = ()
):
    """The frozen config of one run: the variant's file + the schedule + ``opts``."""
    cfg = build_cfg(variant.config_path, schedule.opts() + list(opts))
    if variant.builtin:
        use_builtin_components(cfg)
    cfg.SEED = seed
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def _flatten(results: dict) -> Dict[str, float]:
    """COCOEvaluator's {"segm": {"AP": ..}} -> {"segm/AP": ..}; NaN (no such instances) -> None."""
    flat = {}
    for task, values in results.items():
        for name, value in values.items():
            value = float(value)
            flat[f"{task}/{name}"] = None if math.isnan(value) else round(value, 3)
    return flat


@contextlib.contextmanager
def _run_log(path: str):
    """detectron2's log and pycocotools' prints of one run go to ``path``, not the console
    (the progress bar stays readable)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore", "mrcnn_plugin")]
    saved = [(lg.level, lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        with open(path, "a") as out, contextlib.redirect_stdout(out):
            yield
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate
        handler.close()


def train_and_evaluate(
    variant: Variant, seed: int, schedule: Schedule, run_dir: str, data_root: str,
    opts: Sequence[str] = (),
) -> dict:  # fmt: skip
    """One run: registers its data, trains from scratch with ``seed``, evaluates with COCO."""
    os.makedirs(run_dir, exist_ok=True)
    cfg = build_run_cfg(variant, seed, schedule, run_dir, opts)
    with _run_log(os.path.join(run_dir, "log.txt")):
        register_synthetic_datasets(
            cfg,
            list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST),
            data_root,
            num_train=schedule.num_train,
            num_val=schedule.num_val,
        )
        seed_all_rng(seed)
        start = time.perf_counter()
        trainer = MRCNNTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = MRCNNTrainer.test(cfg, trainer.model)
        eval_seconds = time.perf_counter() - start
    return {
        "metrics": _flatten(results),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "config": os.path.relpath(variant.config_path),
        "builtin": variant.builtin,
        "iterations": schedule.max_iter,
    }


def pending_runs(data: dict, schedule: Schedule, variants: List[Variant], seeds: List[int]):
    """(variant, seed) pairs without a result yet, seed-major (every variant gets its first
    seed before any gets its second, so an early stop still covers all variants)."""
    return [(v, s) for s in seeds for v in variants if run_key(schedule, v, s) not in data["runs"]]


def _run_and_save(variant, seed, schedule, output_dir, data_root, opts, machine):
    """One run, its result merged into results.json; returns (variant, seed, result)."""
    run_dir = os.path.join(output_dir, "runs", schedule.name, f"{variant.key}_s{seed}")
    result = train_and_evaluate(variant, seed, schedule, run_dir, data_root, opts)
    save_result(output_dir, run_key(schedule, variant, seed), result, machine)
    return variant, seed, result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _finished_runs(todo, jobs: int, threads: int, run_args: tuple):
    """Yields (variant, seed, result) as runs finish: in this process, or in ``jobs`` spawned
    workers of ``threads`` torch threads each (one training per core: on a small CPU, two
    one-thread trainings finish sooner than one two-thread training after the other)."""
    if jobs == 1:
        for variant, seed in todo:
            yield _run_and_save(variant, seed, *run_args)
        return
    context = multiprocessing.get_context("spawn")  # a fresh torch and detectron2 per worker
    with ProcessPoolExecutor(jobs, context, _worker_init, (threads,)) as pool:
        futures = [pool.submit(_run_and_save, v, s, *run_args) for v, s in todo]
        for future in as_completed(futures):
            yield future.result()


def run_all(
    variants: List[Variant],
    seeds: List[int],
    schedule: Schedule,
    output_dir: str,
    data_root: str,
    opts: Sequence[str] = (),
    progress: Optional[Callable] = None,
    jobs: int = 1,
) -> dict:
    """Trains every (variant, seed) that has no result in ``output_dir`` yet, ``jobs`` at a
    time (each worker with torch's current thread count); returns all results.
    ``progress(total, initial)`` makes a progress bar (tqdm's interface), or None."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    os.makedirs(output_dir, exist_ok=True)
    data = load_results(output_dir)
    machine = machine_info()
    todo = pending_runs(data, schedule, variants, seeds)
    total = len(variants) * len(seeds)
    bar = progress(total=total, initial=total - len(todo)) if progress else None
    run_args = (schedule, output_dir, data_root, tuple(opts), machine)
    finished = _finished_runs(todo, min(jobs, max(len(todo), 1)), torch.get_num_threads(), run_args)
    for variant, seed, result in finished:
        logger.info(
            "%s seed %d: %s (train %.0f s, eval %.0f s)",
            variant.key,
            seed,
            {k: v for k, v in result["metrics"].items() if k.endswith("/AP")},
            result["train_seconds"],
            result["eval_seconds"],
        )
        if bar is not None:
            bar.set_postfix_str(f"last: {variant.key} seed {seed}")
            bar.update(1)
    if bar is not None:
        bar.close()
    data = load_results(output_dir)
    data.setdefault("machine", machine)
    return data
