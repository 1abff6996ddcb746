"""Export a trained model to ONNX or TorchScript and check it against the eager model.

    mrcnn-export --config-file CFG --format onnx --output out/ \\
        --sample-image a.png [b.png ...] --opts MODEL.WEIGHTS output/model_final.pth

The model is traced on --trace-image (default: the first sample image); the written file takes
images of any size. Every sample image (any sizes) is then run through the written file and
through the eager model, both giving final results in the original image (masks pasted,
keypoints decoded: mrcnn_plugin/deploy/onnx_runner.py's numpy post-processing for the file),
and compared: the same detections and classes, boxes within 1e-3 px, scores within 1e-4,
mask IoU >= 0.99 per instance, keypoints within 0.5 px. Give sample images of other sizes
than the tracing one and with different numbers of detections (zero included): only those
test that the graph did not freeze a size or a count.

Writes into --output: ``model.onnx`` or ``model.ts`` and ``export_report.json`` (see
:func:`mrcnn_plugin.export_verify.export_and_verify`). Run the ONNX file without torch:
``python mrcnn_plugin/deploy/onnx_runner.py --model out/model.onnx --input a.jpg --output
pred/``. Exit status 1 when a check fails or the ONNX graph has a non-standard operator.
"""

import argparse
import sys
from typing import List, Optional

from detectron2.utils.logger import setup_logger

from ..config import build_cfg
from ..export import FORMATS, build_exportable_model
from ..export_verify import REPORT_NAME, export_and_verify
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
        "--sample-image", nargs="+", required=True, metavar="PATH", help="images to verify on"
    )
    parser.add_argument(
        "--trace-image", metavar="PATH", help="image to trace on (default: the first sample)"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser


def _deviations(entry: dict) -> str:
    parts = [f"boxes {entry['boxes_max_abs_px']:.2g} px", f"scores {entry['scores_max_abs']:.2g}"]
    if "mask_iou_min" in entry:
        parts.append(f"mask IoU >= {entry['mask_iou_min']:.4f}")
    if "keypoints_max_abs_px" in entry:
        parts.append(f"keypoints {entry['keypoints_max_abs_px']:.2g} px")
    if not entry["classes_equal"]:
        parts.append("CLASSES DIFFER")
    return ", ".join(parts)


def format_report(report: dict) -> str:
    """A few lines: the file, then one line per verified image."""
    shape = "x".join(str(v) for v in report["traced_input_shape"][1:])
    lines = [f"{report['format']}: {report['file']} (traced at {shape}, any input size)"]
    if report.get("nonstandard_ops"):
        lines.append(f"MISMATCH non-standard ONNX operators: {report['nonstandard_ops']}")
    for entry in report["images"]:
        eager, exported = entry["num_detections"]
        status = "ok" if entry["ok"] else "MISMATCH"
        size = "x".join(str(v) for v in entry["input_shape"][1:])
        detail = _deviations(entry) if eager == exported else "detection counts differ"
        lines.append(
            f"{status:8s} {entry['image']} (input {size}): {eager} eager / {exported} "
            f"exported detections; max deviation {detail}"
        )
    if not report.get("detection_counts_vary"):
        lines.append("warning: all sample images have the same number of detections")
    if not report.get("verified_sizes_other_than_traced"):
        lines.append("warning: no sample image has another input size than the traced one")
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
            model, cfg, args.format, args.output, args.sample_image, args.trace_image
        )
    except ImportError as e:
        raise SystemExit(f"mrcnn-export: {e} (pip install -e '.[export]')") from e
    print(format_report(report))
    print(f"report: {args.output}/{REPORT_NAME}")
    if not report["ok"]:
        raise SystemExit(1)
