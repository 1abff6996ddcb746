"""Run a trained model on images or a video: drawn predictions plus COCO-format JSON results.

    mrcnn-demo --config-file CFG --input img1.png 'photos/*.jpg' folder/ --output out/ \\
        --opts MODEL.WEIGHTS output/model_final.pth
    mrcnn-demo --config-file CFG --video-input clip.mp4 --output out/ --opts MODEL.WEIGHTS W
    mrcnn-demo --config-file CFG --input photos/ --output out/ --mode fast --opts MODEL.WEIGHTS W

Writes into --output: one ``<image name>.png`` per image (masks, boxes, class names and scores,
keypoint skeletons when the model predicts keypoints) and ``results.json``; for a video,
``<video name>.mp4`` (mp4v) and ``<video name>_results.json``. A results file is one JSON list
of COCO detections: {"image_id", "file_name", "category_id", "bbox" [x, y, w, h], "score",
"segmentation" (RLE), "keypoints" (when predicted)}; for videos "image_id" is the frame index.

MODEL.WEIGHTS must fit the config exactly (see :func:`mrcnn_plugin.checkpoint.load_checkpoint`).
Class names come from the metadata of DATASETS.TEST[0] (synthetic ones need no files).

An image that cannot be read (missing, empty, not an image, truncated) is reported and skipped;
the others are still drawn and written. A config, checkpoint or video that cannot be used ends
the tool with one line, ``mrcnn-demo: error: ...``, and exit status 2.
"""

import argparse
import glob
import json
import logging
import os
import sys
from typing import List, Optional

import cv2
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from ..config import build_cfg
from ..data.catalog import dataset_metadata
from ..data.image_io import read_image_checked
from ..data.validation import BadImageError
from ..engine.inference_modes import INFERENCE_MODES
from ..visualize import draw_predictions, strict_predictor
from .common import reports_bad_input

logger = logging.getLogger("mrcnn_plugin.demo")

CALIBRATION_IMAGES = 4  # int8 ranges of --mode quantized: a handful of the inputs
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--input", nargs="+", default=[], help="image paths, glob patterns or folders"
    )
    parser.add_argument("--video-input", help="a video file to run on, frame by frame")
    parser.add_argument("--output", required=True, help="folder for the drawings and JSON")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the detections kept (drawn and written)",
    )
    parser.add_argument(
        "--mode",
        choices=INFERENCE_MODES,
        help="CPU inference mode: exact (float32, detectron2's results), fast (bfloat16 where "
        "the CPU has AMX/AVX512-BF16) or quantized (int8 backbone where it has VNNI/AMX, "
        f"calibrated on the first {CALIBRATION_IMAGES} --input images); default: the model as "
        "detectron2 builds it",
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser


def expand_inputs(items: List[str]) -> List[str]:
    """Image paths from paths, glob patterns and folders (their images, sorted), in order,
    without repeats. Raises FileNotFoundError for an item that matches nothing."""
    paths = []
    for item in items:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no image found")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def calibration_images(paths: List[str]) -> List:
    """The first readable of ``paths`` (at most CALIBRATION_IMAGES), BGR, for "quantized"."""
    images = []
    for path in paths:
        try:
            images.append(read_image_checked(path, format="BGR"))
        except BadImageError:
            continue  # reported when the images are run
        if len(images) == CALIBRATION_IMAGES:
            break
    return images


def setup_predictor(config_file: str, opts: List[str], threshold: float, mode=None, calibration=()):
    """Builds the predictor, MODEL.WEIGHTS loaded strictly, in inference ``mode`` when given.
    Returns (predictor, cfg)."""
    cfg = build_cfg(config_file, opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = threshold
    if mode is not None:
        cfg.MODEL.MRCNN.INFERENCE_MODE = mode
    cfg.freeze()
    return strict_predictor(cfg, mode, calibration), cfg


def coco_results(instances, image_id: int, file_name: str, metadata) -> List[dict]:
    """COCO detections (see the module docstring) of ``instances`` (on the CPU); category ids
    are the data set's own when the metadata maps them, else the model's 0-based classes."""
    if instances.has("pred_keypoints"):
        # instances_to_coco_json shifts keypoints in place; keep the caller's untouched.
        instances.pred_keypoints = instances.pred_keypoints.clone()
    results = instances_to_coco_json(instances, image_id)
    to_dataset_id = {v: k for k, v in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    for result in results:
        result["category_id"] = to_dataset_id.get(result["category_id"], result["category_id"])
        result["file_name"] = file_name
    return results


def _write_json(path: str, results: List[dict]) -> None:
    with open(path, "w") as f:
        json.dump(results, f)
    logger.info("%d detections written to %s", len(results), path)


def _unique_png_path(output: str, source: str, taken: set) -> str:
    stem = os.path.splitext(os.path.basename(source))[0]
    name, n = stem, 1
    while name in taken:  # same file name in two folders
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return os.path.join(output, name + ".png")


def run_on_images(predictor, metadata, paths: List[str], output: str) -> List[str]:
    """Draws and writes one PNG per image and ``results.json``; returns the PNG paths. An image
    that cannot be read is logged and skipped; BadImageError when none can be."""
    written, results, taken, skipped = [], [], set(), []
    for image_id, path in enumerate(tqdm(paths, desc="images", unit="img")):
        try:
            image = read_image_checked(path, format="BGR")
        except BadImageError as e:
            logger.warning("skipped: %s", e)
            skipped.append(str(e))
            continue
        instances = predictor(image)["instances"].to("cpu")
        drawn = draw_predictions(image, instances, metadata)
        png = _unique_png_path(output, path, taken)
        cv2.imwrite(png, drawn[:, :, ::-1])
        written.append(png)
        results.extend(coco_results(instances, image_id, path, metadata))
    _write_json(os.path.join(output, "results.json"), results)
    if skipped:
        logger.warning(
            "%d of %d images could not be read and were skipped", len(skipped), len(paths)
        )
    if skipped and not written:
        raise BadImageError(f"none of the {len(paths)} images could be read; first: {skipped[0]}")
    return written


def run_on_video(predictor, metadata, video: str, output: str) -> str:
    """Writes the drawn frames as ``<name>.mp4`` and the detections as ``<name>_results.json``;
    returns the MP4 path."""
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise OSError(f"--video-input {video!r}: cannot be opened")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    stem = os.path.splitext(os.path.basename(video))[0]
    mp4 = os.path.join(output, stem + ".mp4")
    writer = cv2.VideoWriter(mp4, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write {mp4} with the mp4v codec")
    results = []
    try:
        with tqdm(total=num_frames, desc="frames", unit="frame") as bar:
            frame_index = 0
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                instances = predictor(frame)["instances"].to("cpu")
                writer.write(draw_predictions(frame, instances, metadata)[:, :, ::-1])
                results.extend(coco_results(instances, frame_index, video, metadata))
                frame_index += 1
                bar.update(1)
    finally:
        capture.release()
        writer.release()
    _write_json(os.path.join(output, stem + "_results.json"), results)
    return mp4


@reports_bad_input("mrcnn-demo")
def main(argv: Optional[List[str]] = None):
    """Console entry point; ``argv`` defaults to sys.argv[1:]."""
    parser = argument_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.input and not args.video_input:
        parser.error("nothing to do: give --input and/or --video-input")
    for name in ("detectron2", "fvcore", "mrcnn_plugin"):
        setup_logger(name=name)
    paths = expand_inputs(args.input)
    calibration = calibration_images(paths) if args.mode == "quantized" else []
    if args.mode == "quantized" and not calibration:
        parser.error("--mode quantized calibrates on --input images: give at least one")
    predictor, cfg = setup_predictor(
        args.config_file, args.opts, args.confidence_threshold, args.mode, calibration
    )
    metadata = dataset_metadata(cfg, cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    os.makedirs(args.output, exist_ok=True)
    with torch.no_grad():
        if paths:
            run_on_images(predictor, metadata, paths, args.output)
        if args.video_input:
            run_on_video(predictor, metadata, args.video_input, args.output)
