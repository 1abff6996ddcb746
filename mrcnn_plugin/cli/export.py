"""Export a trained model to TorchScript (traced) or ONNX and check it against eager outputs.

    mrcnn-export --config-file CFG --format torchscript --output out/ \\
        --sample-image a.png [b.png ...] --opts MODEL.WEIGHTS output/model_final.pth

The model is traced on the first sample image; every sample image is then run through the
written file and through the eager model, and the maximum absolute differences of boxes,
scores, classes, mask probabilities (and keypoint heatmaps) are reported. Give images with
different numbers of detections: only those test that the graph did not freeze the count of
the tracing image. All sample images must have the same size after the test-time resize: the
exported graph has a fixed input size.

Writes into --output: ``model.ts`` or ``model.onnx`` and ``export_report.json`` (see
:func:`mrcnn_plugin.export.export_and_verify`). The input and outputs of the exported graph and
how to paste its masks into the image are described in :mod:`mrcnn_plugin.export`. ONNX export
needs the ``onnx`` package, its verification ``onnxruntime`` (skipped, and said so in the
report, without it). Exit status 1 when a verified output differs by more than --atol or a
detection count differs.
"""

import argparse
import sys
from typing import List, Optional

from detectron2.utils.logger import setup_logger

from ..config import build_cfg
from ..export import FORMATS, REPORT_NAME, build_exportable_model, export_and_verify
from .common import reports_bad_input


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="export format")
    parser.add_argument("--output", required=True, help="folder for the model and the report")
    parser.add_argument(
        "--sample-image",
        nargs="+",
        required=True,
        metavar="PATH",
        help="images to trace on (the first) and to verify on (all)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest max-abs difference to eager accepted per output (default 1e-3)",
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser


def format_report(report: dict) -> str:
    """A few lines: the file, then one line per verified image."""
    lines = [f"{report['format']}: {report['file']} (input {report['input']['shape']})"]
    if report.get("skipped"):
        lines.append(report["skipped"])
    for entry in report["images"]:
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in entry["max_abs_diff"].items())
        eager, exported = entry["num_detections"]
        status = "ok" if entry["ok"] else "MISMATCH"
        lines.append(
            f"{status:8s} {entry['image']}: {eager} eager / {exported} exported detections; "
            f"max abs diff {diffs}"
        )
    if report["images"] and not report.get("detection_counts_vary"):
        lines.append("warning: all sample images have the same number of detections")
    return "\n".join(lines)


@reports_bad_input("mrcnn-export")
def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point; ``argv`` defaults to sys.argv[1:]. Returns None: console-script
    wrappers call sys.exit(main()), for which any other value is a failure."""
    args = argument_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("detectron2", "fvcore", "mrcnn_plugin"):
        setup_logger(name=name)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    model = build_exportable_model(cfg)
    try:
        report = export_and_verify(
            model, cfg, args.format, args.output, args.sample_image, args.atol
        )
    except ImportError as e:
        raise SystemExit(f"mrcnn-export: {e}") from e
    print(format_report(report))
    print(f"report: {args.output}/{REPORT_NAME}")
    if report["ok"] is False:
        raise SystemExit(1)
