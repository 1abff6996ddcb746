"""Bad image files: each converts to the exact expected pixels or fails naming the file and the
field; and the validated train loader with 0 and 2 workers (in a subprocess with a timeout, so
a hang fails instead of blocking). Record/annotation cases: test_bad_inputs_records.py."""

import json
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from PIL import Image

from mrcnn_plugin.data import (
    BadImageError,
    BadRecordError,
    ImageSizeMismatchError,
    TooManyBadRecordsError,
    ValidatingDatasetMapper,
    add_data_validation_config,
    build_validated_train_dataset,
    build_validated_train_loader,
    read_image_checked,
)

SIXTEEN = np.array([[0, 1000, 257 * 100, 65535]], np.uint16)


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height RGB pixels (the pixel data is not there)."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + body)
    return str(path)


def _write(path, image: Image.Image, **save):
    image.save(str(path), **save)
    return str(path)


def _expect_error(path, match, fmt="BGR", cls=BadImageError):
    with pytest.raises(cls) as info:
        read_image_checked(path, fmt)
    message = str(info.value)
    assert message.startswith(f"{path}: file_name: "), message
    assert match in message, message
    return message


# ---------------------------------------------------------------- conversions (exact pixels)


def test_16bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    path = str(tmp_path / "gray16.png")
    cv2.imwrite(path, SIXTEEN)
    # detectron2's own reader saturates every non-zero value to white:
    assert utils.read_image(path, "BGR")[0, :, 0].tolist() == [0, 255, 255, 255]
    image = read_image_checked(path, "BGR")
    assert image.dtype == np.uint8 and image.shape == (1, 4, 3)
    assert image[0].tolist() == [[0, 0, 0], [3, 3, 3], [100, 100, 100], [255, 255, 255]]


def test_16bit_rgb_png_takes_the_high_byte(tmp_path):
    path = str(tmp_path / "rgb16.png")
    rgb = np.stack([SIXTEEN, SIXTEEN // 2, SIXTEEN // 3], -1)
    cv2.imwrite(path, rgb[..., ::-1])  # OpenCV writes BGR
    image = read_image_checked(path, "RGB")
    assert image[0].tolist() == [[0, 0, 0], [3, 1, 1], [100, 50, 33], [255, 127, 85]]
    # Same rule as the 16-bit grayscale path: value >> 8.
    assert (image[0, :, 0] == (SIXTEEN[0] >> 8)).all()


def test_cmyk_jpeg_is_converted_to_the_input_format(tmp_path):
    path = _write(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=100)
    assert Image.open(path).mode == "CMYK"
    rgb = read_image_checked(path, "RGB").astype(int)
    bgr = read_image_checked(path, "BGR").astype(int)
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb - [255, 0, 0]).max() <= 2  # pure red, up to JPEG rounding
    assert (bgr == rgb[..., ::-1]).all()


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_rotated_jpeg_matches_detectron2_read_image(tmp_path, orientation):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[0, 0] = 255  # a white marker in the stored top-left corner
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = _write(tmp_path / "rotated.jpg", image, exif=exif.tobytes(), quality=100)
    ours = read_image_checked(path, "BGR")
    assert ours.shape == ((20, 10, 3) if orientation >= 5 else (10, 20, 3))
    assert np.array_equal(ours, utils.read_image(path, "BGR"))


def test_exif_rotated_record_size_is_the_rotated_size(tmp_path):
    image = Image.fromarray(np.full((10, 20, 3), 50, np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: stored 20x10 (w x h), shown 10x20
    path = _write(tmp_path / "rot6.jpg", image, exif=exif.tobytes(), quality=100)
    mapper = ValidatingDatasetMapper(False, augmentations=[], image_format="RGB")
    assert tuple(mapper({"file_name": path, "height": 20, "width": 10})["image"].shape) == (
        3,
        20,
        10,
    )
    with pytest.raises(ImageSizeMismatchError, match="EXIF"):
        mapper({"file_name": path, "height": 10, "width": 20})


def test_palette_png_gives_the_palette_colours(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 255, 7] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    path = _write(tmp_path / "palette.png", image)
    assert Image.open(path).mode == "P"
    assert read_image_checked(path, "RGB")[0].tolist() == [[10, 20, 30], [200, 100, 0], [0, 255, 7]]
    assert read_image_checked(path, "BGR")[0].tolist() == [[30, 20, 10], [0, 100, 200], [7, 255, 0]]


def test_rgba_png_drops_alpha_like_detectron2(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], np.uint8)
    path = _write(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))
    ours = read_image_checked(path, "RGB")
    assert ours[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    assert np.array_equal(ours, utils.read_image(path, "RGB"))


def test_grayscale_png_is_replicated_or_kept_single_channel(tmp_path):
    path = _write(tmp_path / "gray.png", Image.fromarray(np.array([[0, 7, 255]], np.uint8), "L"))
    assert read_image_checked(path, "BGR")[0].tolist() == [[0, 0, 0], [7, 7, 7], [255, 255, 255]]
    single = read_image_checked(path, "L")
    assert single.shape == (1, 3, 1) and single[0, :, 0].tolist() == [0, 7, 255]


def test_float_tiff_has_no_8bit_meaning_and_is_named(tmp_path):
    path = _write(tmp_path / "float.tif", Image.fromarray(np.ones((4, 4), np.float32), "F"))
    _expect_error(path, "floating-point pixels (PIL mode F)")


# ---------------------------------------------------------------- unreadable files (named)


def test_truncated_png_names_the_file(tmp_path):
    full = str(tmp_path / "full.png")
    cv2.imwrite(full, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = open(full, "rb").read()
    path = str(tmp_path / "truncated.png")
    open(path, "wb").write(data[: len(data) // 2])
    _expect_error(path, "truncated or corrupt image data")


def test_decompression_bomb_error_names_the_file(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 50000, 50000)  # > 2 x MAX_IMAGE_PIXELS
    message = _expect_error(path, "decompression-bomb guard")
    assert "2500000000 pixels" in message and "MAX_IMAGE_PIXELS" in message


def test_decompression_bomb_warning_is_an_error_too(tmp_path):
    path = _png_header_only(tmp_path / "big.png", 10000, 10000)  # between 1x and 2x the limit
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path)  # what PIL alone does: warn, then decode 10^8 pixels
    _expect_error(path, "100000000 pixels")


def test_missing_image_file(tmp_path):
    _expect_error(str(tmp_path / "nowhere.png"), "image file not found")


def test_zero_byte_file(tmp_path):
    path = str(tmp_path / "empty.png")
    open(path, "wb").close()
    _expect_error(path, "image file is empty (0 bytes)")


def test_non_image_file(tmp_path):
    path = str(tmp_path / "page.jpg")
    open(path, "w").write("<html>not found</html>")
    _expect_error(path, "not an image file PIL can decode (it starts with b'<html>")


def test_record_size_differs_from_the_file(tmp_path):
    path = _write(tmp_path / "img.png", Image.new("RGB", (20, 10)))
    mapper = ValidatingDatasetMapper(True, augmentations=[], image_format="BGR")
    record = {"file_name": path, "image_id": 4, "height": 20, "width": 10, "annotations": []}
    with pytest.raises(ImageSizeMismatchError) as info:
        mapper(record)
    assert isinstance(info.value, utils.SizeMismatchError)  # detectron2's type still catches it
    assert str(info.value).startswith(f"{path} (image_id 4): height/width: the record says 10x20")
    assert "decodes to 20x10" in str(info.value)


# ---------------------------------------------------------------- the loader, 0 and 2 workers

LOADER_TIMEOUT_S = 300


def _loader_cfg(name, workers, **options):
    cfg = add_data_validation_config(get_cfg())
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 32
    for key, value in options.items():
        cfg.DATALOADER.MRCNN[key] = value
    return cfg


def _register(folder, name, bad_kinds):
    """Six good 32x32 images plus one bad file per kind ("truncated", "empty")."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, kind in enumerate(["good"] * 6 + list(bad_kinds)):
        path = os.path.join(folder, f"{i}_{kind}.png")
        cv2.imwrite(path, np.full((32, 32, 3), 30 * i, np.uint8))
        if kind != "good":
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2] if kind == "truncated" else b"")
        box = {"bbox": [4, 4, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        records.append(
            {"file_name": path, "image_id": i, "height": 32, "width": 32, "annotations": [box]}
        )
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    return records


def _take(loader, batches):
    """Up to ``batches`` batches: (file names seen, image shapes, error or None)."""
    names, shapes = [], set()
    try:
        for batch, _ in zip(loader, range(batches)):
            names += [d["file_name"] for d in batch]
            shapes |= {tuple(d["image"].shape) for d in batch}
    except Exception as e:
        return names, shapes, e
    return names, shapes, None


def run_loader_scenarios(folder, workers):
    """Strict, skipping and over-budget runs of real detectron2 train loaders."""
    out = {}
    _register(os.path.join(folder, "a"), "bad_inputs_strict", ["truncated"])
    loader = build_validated_train_loader(_loader_cfg("bad_inputs_strict", workers))
    _, _, error = _take(loader, 20)
    out["strict"] = [type(error).__name__, str(error)]

    _register(os.path.join(folder, "b"), "bad_inputs_skip", ["truncated"])
    cfg = _loader_cfg("bad_inputs_skip", workers, SKIP_BAD_RECORDS=True, MAX_BAD_FRACTION=0.5)
    dataset, skipper = build_validated_train_dataset(cfg)
    loader = build_detection_train_loader(cfg, mapper=skipper, dataset=dataset)
    names, shapes, error = _take(loader, 8)  # 16 samples: every record is drawn at least once
    out["skip"] = {
        "error": repr(error),
        "num_bad": skipper.num_bad,
        "samples": len(names),
        "bad_returned": sum("truncated" in n for n in names),
        "shapes": sorted(shapes),
    }

    _register(os.path.join(folder, "c"), "bad_inputs_budget", ["truncated", "empty"])
    cfg = _loader_cfg("bad_inputs_budget", workers, SKIP_BAD_RECORDS=True, MAX_BAD_FRACTION=0.2)
    _, _, error = _take(build_validated_train_loader(cfg), 20)
    out["budget"] = [type(error).__name__, str(error)]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_names_skips_and_stops_without_hanging(tmp_path, workers):
    script = [sys.executable, os.path.abspath(__file__), str(tmp_path), str(workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(script, capture_output=True, text=True, timeout=LOADER_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    kind, message = out["strict"]
    assert kind == "BadImageError", message  # the worker's error type reaches the trainer
    bad_file = os.path.join(str(tmp_path), "a", "6_truncated.png")
    assert f"{bad_file}: file_name: truncated or corrupt image data" in message
    assert "[data set 'bad_inputs_strict']" in message

    skip = out["skip"]
    assert skip["error"] == "None" and skip["samples"] == 16
    assert skip["num_bad"] == 1 and skip["bad_returned"] == 0
    assert skip["shapes"] == [[3, 32, 32]]

    kind, message = out["budget"]
    assert kind == "TooManyBadRecordsError", message
    assert "2 of 8 (25.00%) training records are bad" in message
    assert "MAX_BAD_FRACTION = 0.2" in message


def test_error_classes_rebuild_from_their_message():
    # DataLoader workers re-raise an error as type(error)(message): each class must allow it.
    for cls in (BadRecordError, BadImageError, ImageSizeMismatchError, TooManyBadRecordsError):
        assert str(cls("x.png: file_name: why")) == "x.png: file_name: why"


if __name__ == "__main__":  # the loader scenarios, run by the test above in a subprocess
    print(json.dumps(run_loader_scenarios(sys.argv[1], int(sys.argv[2]))))
