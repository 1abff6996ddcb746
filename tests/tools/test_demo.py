"""tools/demo.py on 3 generated images and a 5-frame generated video, with a tiny untrained
model saved as a checkpoint; the JSON is checked against DefaultPredictor run here."""

import json
import logging
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from tool_helpers import SHAPES_CONFIG, TINY_OPTS, run_tool

from mrcnn_plugin.cli.demo import expand_inputs, main
from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data.catalog import dataset_metadata, split_synthetic_name

SIZE = 64
THRESHOLD = 0.1  # an untrained 3-class head scores about 1/4 everywhere
DETECTIONS = 10  # TEST.DETECTIONS_PER_IMAGE in TINY_OPTS
KEYS = {"image_id", "file_name", "category_id", "bbox", "score", "segmentation"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint of the tiny model at its random initialisation (seeded)."""
    torch.manual_seed(0)
    model = build_model(build_cfg(SHAPES_CONFIG, TINY_OPTS))
    folder = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(model, save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


def _write_inputs(folder):
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        cv2.rectangle(image, (10 + i, 12), (40, 50), (255, 255, 255), -1)
        images.append(str(folder / f"img{i}.png"))
        cv2.imwrite(images[-1], image)
    video = str(folder / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (SIZE, SIZE))
    for _ in range(5):
        writer.write(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    writer.release()
    return images, video


def _check_detection(det, file_names):
    assert KEYS <= set(det), det
    assert det["file_name"] == file_names[det["image_id"]]
    assert det["category_id"] in (1, 2, 3)  # the shapes data set's own ids, not 0-based
    assert det["score"] >= THRESHOLD
    x, y, w, h = det["bbox"]
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= SIZE + 1e-3
    mask = mask_util.decode(det["segmentation"])
    assert mask.shape == (SIZE, SIZE)


def test_demo_images_and_video(tmp_path, weights):
    (tmp_path / "in").mkdir()
    images, video = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_tool([
        "tools/demo.py",
        "--config-file", SHAPES_CONFIG,
        "--input", images[0], str(tmp_path / "in" / "img[12].png"),  # a path and a glob
        "--video-input", video,
        "--output", str(out),
        "--confidence-threshold", str(THRESHOLD),
        "--opts", *TINY_OPTS, "MODEL.WEIGHTS", weights,
    ])  # fmt: skip

    for path in images:
        drawn = cv2.imread(str(out / os.path.basename(path)))
        assert drawn is not None and drawn.shape == (SIZE, SIZE, 3)

    with open(out / "results.json") as f:
        results = json.load(f)
    assert isinstance(results, list) and results
    for det in results:
        _check_detection(det, images)
    for image_id in range(3):
        assert len([d for d in results if d["image_id"] == image_id]) <= DETECTIONS

    # The same detections as DefaultPredictor gives here for the first image.
    cfg = build_cfg(SHAPES_CONFIG, TINY_OPTS + ["MODEL.WEIGHTS", weights])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = THRESHOLD
    instances = DefaultPredictor(cfg)(cv2.imread(images[0]))["instances"]
    ours = sorted((d for d in results if d["image_id"] == 0), key=lambda d: -d["score"])
    assert len(ours) == len(instances) > 0
    assert (cv2.imread(str(out / "img0.png")) != cv2.imread(images[0])).any()  # drawn on
    order = torch.argsort(instances.scores, descending=True)
    for det, k in zip(ours, order.tolist()):
        x0, y0, x1, y1 = instances.pred_boxes.tensor[k].tolist()
        assert det["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
        assert det["score"] == pytest.approx(instances.scores[k].item(), abs=1e-5)
        assert det["category_id"] == instances.pred_classes[k].item() + 1
        mask = instances.pred_masks[k].numpy()
        assert (mask_util.decode(det["segmentation"]) == mask).all()

    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (SIZE, SIZE, 3)
        frames += 1
    capture.release()
    assert frames == 5
    with open(out / "clip_results.json") as f:
        video_results = json.load(f)
    assert video_results and {d["image_id"] for d in video_results} <= set(range(5))
    for det in video_results:
        _check_detection(det, {i: video for i in range(5)})


def test_demo_skips_an_unreadable_image(tmp_path, weights, caplog):
    """One of five images is not an image: it is reported and skipped, the images after it
    are still drawn, and results.json is written. Run in process: the tool's start-up is
    tested above."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), image)
    bad = folder / "img2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this PNG was cut off")
    out = tmp_path / "out"
    logging.getLogger("mrcnn_plugin.demo").addHandler(caplog.handler)  # it does not propagate
    try:
        main([
            "--config-file", SHAPES_CONFIG, "--input", str(folder), "--output", str(out),
            "--confidence-threshold", str(THRESHOLD),
            "--opts", *TINY_OPTS, "MODEL.WEIGHTS", weights,
        ])  # fmt: skip
    finally:
        logging.getLogger("mrcnn_plugin.demo").removeHandler(caplog.handler)
    good = [str(folder / f"img{i}.png") for i in (0, 1, 3, 4)]
    assert sorted(os.listdir(out)) == [
        "img0.png",
        "img1.png",
        "img3.png",
        "img4.png",
        "results.json",
    ]
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any(str(bad) in m for m in skips), skips
    assert any("1 of 5 images" in m for m in skips), skips
    with open(out / "results.json") as f:
        results = json.load(f)
    assert {d["file_name"] for d in results} <= set(good)
    assert {d["image_id"] for d in results} & {3, 4}  # images after the bad one: ids kept


def test_expand_inputs(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    a, b = str(tmp_path / "a.jpg"), str(tmp_path / "b.png")
    assert expand_inputs([str(tmp_path)]) == [a, b]  # a folder: its images, sorted
    assert expand_inputs([str(tmp_path / "*.png"), a, b]) == [b, a]  # no repeats
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_inputs([str(tmp_path / "missing.png")])


def test_synthetic_metadata_needs_no_files():
    cfg = build_cfg(SHAPES_CONFIG, ["MODEL.ROI_HEADS.NUM_CLASSES", "2"])
    shapes = dataset_metadata(cfg, "mrcnn_shapes_test_only_val")
    assert shapes.thing_classes == ["circle", "square"]
    assert shapes.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    persons = dataset_metadata(cfg, "mrcnn_persons_test_only_val")
    assert persons.thing_classes == ["person"] and len(persons.keypoint_names) == 17
    assert persons.keypoint_connection_rules  # the skeleton the Visualizer draws
    assert split_synthetic_name("mrcnn_shapes_val") == ("shapes", "mrcnn_shapes")
    assert split_synthetic_name("mrcnn_persons_small_train") == ("persons", "mrcnn_persons_small")
    assert split_synthetic_name("coco_2017_val") is None
    assert split_synthetic_name("mrcnn_shapes_test") is None


def _results(folder):
    with open(folder / "results.json") as f:
        return json.load(f)


def _demo(tmp_path, weights, images, name, *extra):
    out = tmp_path / name
    main(["--config-file", SHAPES_CONFIG, "--input", *images, "--output", str(out),
          "--confidence-threshold", str(THRESHOLD), *extra,
          "--opts", *TINY_OPTS, "MODEL.WEIGHTS", weights])  # fmt: skip
    return _results(out)


class _Messages(logging.Handler):
    """Collects a logger's messages, wherever detectron2's setup_logger sent its output."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def take(self) -> str:
        text, self.messages = "\n".join(self.messages), []
        return text


@pytest.fixture
def mode_messages():
    handler = _Messages()
    log = logging.getLogger("mrcnn_plugin.engine.inference_modes")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def test_demo_inference_modes(tmp_path, weights, mode_messages, monkeypatch):
    """--mode exact gives the model's own detections (up to float rounding); fast and quantized
    fall back with one log line on a CPU without the units, and quantized runs (int8 backbone,
    calibrated on the inputs, GroupNorm or FrozenBatchNorm) where the CPU reports VNNI."""
    from mrcnn_plugin.engine.cpu_features import CPUINFO_ENV

    (tmp_path / "in").mkdir()
    images, _ = _write_inputs(tmp_path / "in")
    plain = _demo(tmp_path, weights, images, "plain")
    exact = _demo(tmp_path, weights, images, "exact", "--mode", "exact")
    assert len(exact) == len(plain) > 0
    for det in exact:  # tied scores may swap order: match each to one of the same image
        same = [d for d in plain if d["image_id"] == det["image_id"]
                and d["category_id"] == det["category_id"]
                and np.allclose(d["bbox"], det["bbox"], atol=1e-3)
                and abs(d["score"] - det["score"]) < 1e-4]  # fmt: skip
        assert same, det

    plain_cpu = tmp_path / "cpuinfo_avx2"
    plain_cpu.write_text("processor\t: 0\nmodel name\t: test CPU\nflags\t\t: sse2 avx2 fma\n")
    monkeypatch.setenv(CPUINFO_ENV, str(plain_cpu))
    mode_messages.take()
    fast = _demo(tmp_path, weights, images, "fast", "--mode", "fast")
    assert "'fast' runs as 'exact'" in mode_messages.take()
    assert len(fast) == len(exact)

    vnni_cpu = tmp_path / "cpuinfo_vnni"
    vnni_cpu.write_text("processor\t: 0\nmodel name\t: test CPU\nflags\t\t: avx2 avx512_vnni\n")
    monkeypatch.setenv(CPUINFO_ENV, str(vnni_cpu))
    # The tiny model's backbone has GroupNorm: its convs run in int8 with int8 GroupNorms.
    quantized_gn = _demo(tmp_path, weights, images, "gn", "--mode", "quantized")
    assert "Inference mode 'quantized'" in mode_messages.take()
    assert quantized_gn
    for det in quantized_gn:
        _check_detection(det, images)

    frozen_bn = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", ""]
    torch.manual_seed(0)
    model = build_model(build_cfg(SHAPES_CONFIG, TINY_OPTS + frozen_bn))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("frozen_bn")
    out = tmp_path / "quantized"
    main(["--config-file", SHAPES_CONFIG, "--input", *images, "--output", str(out),
          "--confidence-threshold", "0.0", "--mode", "quantized", "--opts", *TINY_OPTS,
          *frozen_bn, "MODEL.WEIGHTS", str(tmp_path / "frozen_bn.pth")])  # fmt: skip
    assert "Inference mode 'quantized'" in mode_messages.take()
    quantized = _results(out)
    assert quantized
    for det in quantized:
        _check_detection(det, images)
