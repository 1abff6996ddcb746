"""Benchmark: detectron2's built-in model, the plugin in each inference mode, torchvision.

    mrcnn-benchmark            # R50-FPN Mask R-CNN and Keypoint R-CNN, 800x1216, 2 threads

For each config (``--config-file``, repeatable; default the two R50-FPN 1x configs) every
contender runs one image of ``--image-size`` with ROI_HEADS.SCORE_THRESH_TEST 0 (random
weights give few confident detections; 0 gives the 100 of TEST.DETECTIONS_PER_IMAGE):

* ``detectron2``: detectron2's built-in model of the config, float32;
* ``plugin <mode>`` for each ``--mode`` (exact, fast, quantized; MODEL.MRCNN.INFERENCE_MODE);
* ``onnxruntime``: the plugin's float32 model exported as ``mrcnn-export --format onnx`` does,
  in ONNX Runtime's CPU execution provider with the same threads, plus the torch-free
  runner's numpy mask pasting and keypoint decoding (``--no-onnx`` leaves it out);
* ``torchvision fp32`` / ``torchvision bf16`` (autocast + channels-last, where the CPU has
  bfloat16 units): torchvision's model of the same architecture, its own random weights.

detectron2 and the plugin share one set of random weights (batch-norm statistics set on the
image so activations keep unit scale; torchvision's are set the same way). Each contender
lives in its own worker process (so its peak RSS is its own) and the repeats are interleaved:
repeat 1 of every contender, then repeat 2, ..., so load drift on a shared machine hits all
alike. The floor is the model's FLOPs (fvcore) over this CPU's best measured convolution rate
(mrcnn_plugin/speed_floor.py), measured between the repeats too.

``--task train`` (or ``both``) also times training steps of the plugin and detectron2 models.
"""

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from .common import reports_bad_input

DEFAULT_CONFIGS = (
    "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
)
logger = logging.getLogger(__name__)
IMPLEMENTATIONS = ("plugin", "detectron2")  # the training comparison
_TAG = "@@mrcnn-benchmark "


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", action="append", help="repeatable; default: R50-FPN")
    parser.add_argument(
        "--mode", nargs="+", default=["exact", "fast", "quantized"],
        choices=("exact", "fast", "quantized"), help="the plugin's inference modes to run",
    )  # fmt: skip
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--no-onnx", action="store_true", help="no ONNX Runtime row")
    parser.add_argument("--task", choices=("inference", "train", "both"), default="inference")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images-per-batch", type=int, default=2, help="training batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast of the training task")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-output", help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # contender config weights
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    return parser


def _opts(args):
    return [o for o in args.opts if o != "--"]


# --- workers -------------------------------------------------------------------------------


def _send(obj):
    print(_TAG + json.dumps(obj), flush=True)


def run_worker(args):
    from .benchmark_worker import serve

    contender, config_file, weights = args.worker
    serve(contender, config_file, weights, args, _opts(args), _send)


class Worker:
    """A contender's process: build + warm-up at start, then one timed run per ``run()``."""

    def __init__(self, contender, config_file, weights, forwarded):
        cmd = [sys.executable, "-m", "mrcnn_plugin.cli.benchmark", "--worker", contender,
               config_file, weights, *forwarded]  # fmt: skip
        self.name = contender
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and block it
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.ready = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG) :])
        self.proc.wait()
        self.log.seek(0)
        err = self.log.read()
        raise RuntimeError(f"benchmark worker {self.name} failed:\n{err[-4000:]}")

    def call(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        result = self.call("quit")
        self.proc.wait()
        return result


def _contenders(args, config_file):
    from ..benchmark import TORCHVISION_MODELS
    from ..engine.cpu_features import has_bf16

    names = ["detectron2"] + [f"plugin {m}" for m in args.mode]
    if not args.no_onnx:
        if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
            names.append("onnxruntime")
        else:
            logger.warning("No ONNX Runtime row: onnx/onnxruntime are not installed")
    if not args.no_torchvision and os.path.basename(config_file) in TORCHVISION_MODELS:
        names += ["torchvision fp32"] + (["torchvision bf16"] if has_bf16() else [])
    return names + ["floor"]


def benchmark_config(args, config_file, forwarded, tmp):
    """Rows of one config: every contender, repeats interleaved."""
    from ..benchmark import save_shared_weights

    weights = os.path.join(tmp, os.path.basename(config_file) + ".pth")
    save_shared_weights(config_file, _opts(args), args.image_size, weights)
    workers = []
    try:
        for name in _contenders(args, config_file):
            workers.append(Worker(name, config_file, weights, forwarded))
        times = {w.name: [] for w in workers}
        for _ in range(args.repeats):
            for w in workers:
                times[w.name].append(w.call("run"))
        finals = {w.name: w.close() for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    readies = {w.name: w.ready for w in workers}
    floor_runs = times.pop("floor")
    rates = {p: max(r[p] for r in floor_runs) for p in floor_runs[0]}
    gflop = readies["detectron2"]["gflop"]
    rows = []
    for name, runs in times.items():
        row = {"config": config_file, "contender": name, "median_s": statistics.median(runs),
               "runs_s": runs, "peak_mib": finals[name]["peak_mib"], **readies[name]}  # fmt: skip
        rows.append(row)
    return {"config": config_file, "rows": rows, "gflop": gflop, "rates": rates}


# --- table ---------------------------------------------------------------------------------


def _precision_of(row):
    mode = row.get("mode", "fp32")
    return "fp32" if mode in ("exact", "fp32") else "bf16"


def format_table(result, cpu: str) -> str:
    rows, rates = result["rows"], result["rates"]
    gflop = result["gflop"]["total"]
    floors = {p: gflop / rate for p, rate in rates.items() if rate > 0}
    base = next(r for r in rows if r["contender"] == "detectron2")["median_s"]
    lines = [
        f"{os.path.basename(result['config'])}  ({cpu})",
        f"model FLOPs (fvcore, matrix ops): {gflop:.1f} GFLOP; best conv rates: "
        + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items())
        + "; floors: "
        + ", ".join(f"{p} {s:.3f} s" for p, s in floors.items()),
        f"{'contender':<22} {'ran as':<10} {'median s':>9} {'x d2 fp32':>10} {'x floor':>12} "
        f"{'peak MiB':>9} {'dets':>5} {'GFLOP/s':>8}",
    ]
    for r in rows:
        precision = _precision_of(r)
        floor = floors.get(precision)
        x_floor = f"{r['median_s'] / floor:.2f} ({precision})" if floor else "n/a"
        lines.append(
            f"{r['contender']:<22} {r.get('mode', ''):<10} {r['median_s']:9.3f} "
            f"{r['median_s'] / base:9.3f}x {x_floor:>12} {r['peak_mib']:9.0f} "
            f"{r['detections']:5d} {gflop / r['median_s']:8.0f}"
        )
    reached = max(gflop / r["median_s"] for r in rows if _precision_of(r) == "fp32")
    ok = "yes" if rates.get("fp32", 0) >= reached else "NO"
    lines.append(f"floor kernel fp32 rate >= best fp32 rate reached in the model: {ok}")
    return "\n".join(lines)


def run_training(args, forwarded):
    """The plugin vs detectron2 training step (peak memory per subprocess)."""
    from detectron2.modeling import build_model

    from ..benchmark import load_cfg

    rows = []
    for config_file in args.config_file or DEFAULT_CONFIGS:
        cfg = load_cfg(config_file, _opts(args) + ["MODEL.DEVICE", "cpu"], builtin=False)
        with tempfile.TemporaryDirectory() as tmp:
            weights = os.path.join(tmp, "weights.pth")
            torch.manual_seed(0)
            torch.save(build_model(cfg).state_dict(), weights)
            for impl in IMPLEMENTATIONS:
                w = Worker(f"train {impl}", config_file, weights, forwarded)
                row = w.call("run")
                w.close()
                row.update(config=config_file, contender=f"train {impl}")
                rows.append(row)
    return rows


def format_training(rows) -> str:
    lines = [f"{'training step':<40} {'median s':>9} {'img/s':>7} {'peak MiB':>9}"]
    for r in rows:
        lines.append(
            f"{os.path.basename(r['config']) + ' ' + r['contender']:<40} {r['median_s']:9.3f} "
            f"{r['images_per_s']:7.2f} {r['peak_mib']:9.0f}"
        )
    return "\n".join(lines)


def run(argv=None):
    """Runs the benchmark (or, with --worker, one contender) and returns the results."""
    args = parse_args().parse_args(argv)
    if args.worker:
        return run_worker(args)
    from ..engine.cpu_features import describe_cpu

    torch.set_num_threads(args.threads)
    cpu = describe_cpu()
    print(f"CPU: {cpu}")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {"cpu": cpu, "inference": [], "train": []}
    if args.task in ("inference", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            for config_file in args.config_file or DEFAULT_CONFIGS:
                result = benchmark_config(args, config_file, forwarded, tmp)
                print(format_table(result, cpu), flush=True)
                results["inference"].append(result)
    if args.task in ("train", "both"):
        results["train"] = run_training(args, forwarded)
        print(format_training(results["train"]))
    if args.json_output:
        with open(args.json_output, "w") as f:
            json.dump(results, f, indent=2)
    return results


@reports_bad_input("mrcnn-benchmark")
def main(argv=None):
    run(argv)  # a console script exits with main()'s return value: return None


if __name__ == "__main__":
    main()
