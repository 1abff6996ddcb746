"""CPU latency of an exported ONNX model in ONNX Runtime next to the eager PyTorch model.

:func:`measure_onnx_vs_eager` times, on the same model input and with the same number of
threads, the eager model's ``forward`` (which returns pasted masks and decoded keypoints) and
ONNX Runtime's CPU execution provider on the exported graph, alone and followed by the numpy
post-processing that gives the same results (``mrcnn_plugin.deploy.onnx_runner.postprocess``).
Each figure is the median of ``runs`` timed runs after ``warmup`` untimed ones, the three taking
turns in the same process, with the CPU model printed, so the ratio is the number to quote.

    python -m mrcnn_plugin.export_latency --config-file CFG --onnx out/model.onnx \\
        --image a.png --threads 1 --runs 10 [--opts MODEL.WEIGHTS model.pth ...]
"""

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .deploy.onnx_runner import OnnxPredictor, postprocess

__all__ = ["cpu_model", "measure_onnx_vs_eager"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interleaved_medians_ms(fns: Dict[str, Callable[[], object]], runs: int, warmup: int):
    """Median ms of each function, run in turns (one of each per round) so that a change of
    load on a shared machine reaches all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def measure_onnx_vs_eager(
    onnx_path: str,
    model: torch.nn.Module,
    image: torch.Tensor,
    num_threads: int = 1,
    runs: int = 10,
    warmup: int = 2,
) -> dict:
    """Median latency (ms) of the eager ``model`` and of ``onnx_path`` in ONNX Runtime (CPU).

    Args:
        onnx_path: a file written by ``mrcnn-export --format onnx`` from ``model``.
        model: the eager GeneralizedRCNN in eval mode.
        image: one (3, H, W) float32 model input (already resized).
        num_threads: torch's intra-op threads and ONNX Runtime's intra_op_num_threads.
    Returns:
        {"cpu", "threads", "runs", "input_shape", "eager_ms", "onnx_ms" (the graph),
        "onnx_postprocess_ms" (graph + numpy post-processing, the eager forward's
        counterpart), "eager_over_onnx" (eager_ms / onnx_postprocess_ms),
        "num_detections": [eager, onnx]}.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    size = tuple(image.shape[1:])
    array = image.detach().cpu().numpy().astype(np.float32)
    predictor = OnnxPredictor(onnx_path, num_threads=num_threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():

            def eager():
                return model([{"image": image}])[0]["instances"]

            medians = _interleaved_medians_ms(
                {
                    "eager": eager,
                    "onnx": lambda: predictor.run(array),
                    "onnx_postprocess": lambda: postprocess(predictor.run(array), size),
                },
                runs,
                warmup,
            )
            num_eager = len(eager())
    finally:
        torch.set_num_threads(previous_threads)
    num_onnx = len(postprocess(predictor.run(array), size)["scores"])
    eager_ms, onnx_ms, onnx_post_ms = (medians[k] for k in ("eager", "onnx", "onnx_postprocess"))
    return {
        "cpu": cpu_model(),
        "threads": num_threads,
        "runs": runs,
        "input_shape": list(image.shape),
        "eager_ms": eager_ms,
        "onnx_ms": onnx_ms,
        "onnx_postprocess_ms": onnx_post_ms,
        "eager_over_onnx": eager_ms / onnx_post_ms,
        "num_detections": [num_eager, num_onnx],
    }


def main(argv: Optional[list] = None) -> None:
    """Prints :func:`measure_onnx_vs_eager`'s result as JSON for a config and an image."""
    from .config import build_cfg
    from .export import build_exportable_model, load_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--onnx", required=True, help="the model exported from the config")
    parser.add_argument("--image", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    model = build_exportable_model(cfg)
    image, _ = load_image(cfg, args.image)
    print(json.dumps(measure_onnx_vs_eager(args.onnx, model, image, args.threads, args.runs)))


if __name__ == "__main__":
    main()
