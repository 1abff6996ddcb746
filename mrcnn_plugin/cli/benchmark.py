"""Benchmark a config's model against detectron2's built-in model of the same config.

    mrcnn-benchmark --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml \
        --mode both --image-size 800 1216 [KEY VALUE ...]

Prints a table of inference latency (median seconds per image), training throughput
(iterations/s and images/s) and peak memory, with plugin/detectron2 ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from detectron2.modeling import build_model

from ..benchmark import load_cfg, measure
from .common import reports_bad_input

IMPLEMENTATIONS = ("plugin", "detectron2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--mode", choices=("inference", "train", "both"), default="both")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--images-per-batch", type=int, default=2, help="training batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-output", help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # impl mode weights
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    return parser.parse_args(argv)


def run_worker(args):
    impl, mode, weights = args.worker
    cfg = load_cfg(args.config_file, args.opts + ["MODEL.DEVICE", args.device], impl != "plugin")
    row = measure(
        cfg, torch.load(weights, weights_only=True), mode, args.images_per_batch, *args.image_size,
        args.warmup, args.repeats, args.precision,
    )  # fmt: skip
    print(json.dumps(row))


def format_table(rows):
    header = f"{'model':<11} {'mode':<9} {'median s':>9} {'it/s':>7} {'img/s':>7} {'peak MiB':>9}"
    lines = [header + "  ratio (time, memory) vs detectron2", "-" * 80]
    base = {r["mode"]: r for r in rows if r["model"] == "detectron2"}
    for r in rows:
        ratio = ""
        if r["mode"] in base and r["model"] != "detectron2":
            ref = base[r["mode"]]
            ratio = (
                f"  {r['median_s'] / ref['median_s']:.3f}x, {r['peak_mib'] / ref['peak_mib']:.3f}x"
            )
        lines.append(
            f"{r['model']:<11} {r['mode']:<9} {r['median_s']:9.4f} {r['iters_per_s']:7.2f} "
            f"{r['images_per_s']:7.2f} {r['peak_mib']:9.0f}{ratio}"
        )
    return "\n".join(lines)


def run(argv=None):
    """Runs the benchmark (or, with --worker, one measurement) and returns the table rows."""
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    modes = ("inference", "train") if args.mode == "both" else (args.mode,)
    cfg = load_cfg(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"], builtin=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pth")
        torch.manual_seed(0)
        torch.save(build_model(cfg).state_dict(), weights)  # the same weights for both models
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--"]
        for mode in modes:
            for impl in IMPLEMENTATIONS:
                cmd = [sys.executable, "-m", "mrcnn_plugin.cli.benchmark", "--worker", impl, mode,
                       weights, *forwarded]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                images = args.images_per_batch if mode == "train" else 1
                row.update(model=impl, mode=mode, iters_per_s=1 / row["median_s"])
                row["images_per_s"] = images / row["median_s"]
                rows.append(row)
    print(format_table(rows))
    if args.json_output:
        with open(args.json_output, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


@reports_bad_input("mrcnn-benchmark")
def main(argv=None):
    run(argv)  # a console script exits with main()'s return value: return None


if __name__ == "__main__":
    main()
