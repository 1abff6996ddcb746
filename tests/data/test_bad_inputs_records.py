"""Bad records and annotations: each fails naming the image file and the field (e.g.
``annotations[0].bbox``), is dropped the way detectron2 drops it (counted and logged), or, when
DATALOADER.MRCNN.SKIP_BAD_RECORDS is set, is skipped and counted up to the stated limit.
Image-file cases and the loader with workers: test_bad_inputs.py."""

import json
import logging
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from PIL import Image

from mrcnn_plugin.data import (
    BadDatasetError,
    BadRecordError,
    RecordChecker,
    TooManyBadRecordsError,
    ValidatingDatasetMapper,
    add_data_validation_config,
    load_validated_train_records,
)

SIZE = 32  # images are SIZE x SIZE
CHECKER = RecordChecker(num_classes=3, mask_on=True, keypoint_on=True, num_keypoints=2)


def _ann(**changes):
    ann = {
        "bbox": [4.0, 4.0, 10.0, 8.0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": [[4.0, 4.0, 14.0, 4.0, 14.0, 12.0]],
        "keypoints": [5.0, 5.0, 2, 9.0, 9.0, 1],
    }
    ann.update(changes)
    return {k: v for k, v in ann.items() if v is not None}  # None removes the field


def _record(*anns, **changes):
    record = {"file_name": "/data/img7.png", "image_id": 7, "height": SIZE, "width": SIZE}
    record["annotations"] = list(anns) if anns else [_ann()]
    record.update(changes)
    return record


def _fails(record, field, reason, checker=CHECKER):
    with pytest.raises(BadRecordError) as info:
        checker.check(record)
    expected = f"{record.get('file_name', 'record without a file_name')} (image_id 7): {field}: "
    assert str(info.value).startswith(expected + reason), str(info.value)


def test_a_good_record_passes():
    assert CHECKER.check(_record(_ann(), _ann(category_id=2, iscrowd=1, bbox=[math.nan] * 4))) == []


# ---------------------------------------------------------------- boxes


def test_nan_box():
    _fails(_record(_ann(bbox=[4.0, math.nan, 10.0, 8.0])), "annotations[0].bbox", "contains NaN")


def test_inf_box():
    _fails(_record(_ann(), _ann(bbox=[4, 4, math.inf, 8])), "annotations[1].bbox", "contains Inf")


def test_negative_size_box():
    _fails(_record(_ann(bbox=[4, 4, -3, 8])), "annotations[0].bbox", "negative size -3 x 8")
    reversed_xyxy = _ann(bbox=[20, 4, 10, 12], bbox_mode=BoxMode.XYXY_ABS)
    _fails(_record(reversed_xyxy), "annotations[0].bbox", "negative size -10 x 8 (XYXY_ABS")


def test_box_outside_the_image():
    reason = f"[40, 4, 10, 8] lies outside the {SIZE}x{SIZE} image"
    _fails(_record(_ann(bbox=[40, 4, 10, 8])), "annotations[0].bbox", reason)
    assert CHECKER.check(_record(_ann(bbox=[-2, 4, 10, 8]))) == []  # partly inside: clipped


def test_zero_area_box_is_dropped_by_detectron2_and_counted(tmp_path, caplog):
    record = _record(_ann(), _ann(bbox=[4, 4, 0, 8]))
    assert CHECKER.check(record) == [
        "/data/img7.png (image_id 7): annotations[1].bbox: zero area [4, 4, 0, 8]"
    ]
    # Through the loader: logged with its count; through the mapper: dropped from "instances".
    path = str(tmp_path / "img.png")
    Image.new("RGB", (SIZE, SIZE)).save(path)
    cfg = _cfg(mask_on=False)
    name = _register("bad_records_zero_area", [_record(_ann(), _ann(bbox=[4, 4, 0, 8]))], path)
    with caplog.at_level(logging.WARNING, logger="mrcnn_plugin.data.train_loader"):
        train = load_validated_train_records(_cfg(name, mask_on=False))
    assert "1 annotations have zero-area boxes" in caplog.text
    mapper = ValidatingDatasetMapper(cfg, is_train=True)
    assert len(mapper(train.records[0])["instances"]) == 1


def test_bbox_mode_missing_or_unsupported():
    _fails(_record(_ann(bbox_mode=None)), "annotations[0].bbox_mode", "missing")
    _fails(_record(_ann(bbox_mode=9)), "annotations[0].bbox_mode", "9 is not a BoxMode")
    rotated = _ann(bbox_mode=BoxMode.XYWHA_ABS)
    _fails(_record(rotated), "annotations[0].bbox_mode", "XYWHA_ABS is not supported")


# ---------------------------------------------------------------- masks


def test_polygon_with_fewer_than_3_points():
    bad = _ann(segmentation=[[4, 4, 14, 4, 14, 12], [1.0, 1.0, 5.0, 5.0]])
    reason = "has 2 points; a polygon needs at least 3"
    _fails(_record(bad), "annotations[0].segmentation[1]", reason)


def test_polygon_of_odd_length():
    bad = _ann(segmentation=[[4, 4, 14, 4, 14, 12, 9]])
    _fails(_record(bad), "annotations[0].segmentation[0]", "has an odd number (7) of coordinates")


def _rle(height, width):
    rle = mask_util.encode(np.asfortranarray(np.ones((height, width), np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_rle_with_wrong_size():
    checker = RecordChecker(num_classes=3, mask_on=True, mask_format="bitmask")
    assert checker.check(_record(_ann(segmentation=_rle(SIZE, SIZE)))) == []
    bad = _record(_ann(segmentation=_rle(SIZE, SIZE + 1)))
    reason = f"[{SIZE}, {SIZE + 1}] differs from the image's [{SIZE}, {SIZE}]"
    _fails(bad, "annotations[0].segmentation.size", reason, checker)


def test_rle_needs_bitmask_format_and_compressed_counts():
    reason = "is RLE, which needs INPUT.MASK_FORMAT 'bitmask' (it is 'polygon')"
    _fails(_record(_ann(segmentation=_rle(SIZE, SIZE))), "annotations[0].segmentation", reason)
    checker = RecordChecker(num_classes=3, mask_on=True, mask_format="bitmask")
    raw = _ann(segmentation={"size": [SIZE, SIZE], "counts": [0, SIZE * SIZE]})
    _fails(_record(raw), "annotations[0].segmentation.counts", "is uncompressed RLE", checker)


def test_masks_missing_while_mask_on():
    reason = "missing while MODEL.MASK_ON is True"
    _fails(_record(_ann(), _ann(segmentation=None)), "annotations[1].segmentation", reason)
    no_masks = RecordChecker(num_classes=3)
    assert no_masks.check(_record(_ann(segmentation=None, keypoints=None))) == []


# ---------------------------------------------------------------- categories, keypoints, types


def test_category_id_out_of_range():
    reason = "3 is outside [0, 3) (MODEL.ROI_HEADS.NUM_CLASSES)"
    _fails(_record(_ann(category_id=3)), "annotations[0].category_id", reason)
    _fails(_record(_ann(category_id=-1)), "annotations[0].category_id", "-1 is outside [0, 3)")


def test_category_id_unknown_to_the_coco_json_names_the_file(tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (SIZE, SIZE)).save(str(image))
    coco = {
        "images": [{"id": 1, "file_name": "img.png", "height": SIZE, "width": SIZE}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    json_file = str(tmp_path / "train.json")
    json.dump(coco, open(json_file, "w"))
    name = "bad_records_unknown_category"
    register_coco_instances(name, {}, json_file, str(tmp_path))
    try:
        with pytest.raises(BadDatasetError) as info:
            load_validated_train_records(_cfg(name, mask_on=False))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    message = str(info.value)
    assert message.startswith(f"data set '{name}' (annotation file {json_file}): could not be")
    assert "category_id=99" in message


def test_keypoints_of_wrong_length():
    reason = "has 5 numbers, needs 3 x 2 = 6 (MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS)"
    _fails(_record(_ann(keypoints=[5, 5, 2, 9, 9])), "annotations[0].keypoints", reason)
    _fails(_record(_ann(keypoints=None)), "annotations[0].keypoints", "missing while MODEL.KEYP")


def test_keypoint_visibility_outside_0_1_2():
    reason = "visibility 3 of keypoint 1 is not 0, 1 or 2"
    _fails(_record(_ann(keypoints=[5, 5, 2, 9, 9, 3])), "annotations[0].keypoints", reason)


def test_wrong_dtype_fields():
    _fails(_record(_ann(category_id="1")), "annotations[0].category_id", "must be an int, got '1'")
    _fails(_record(_ann(category_id=1.0)), "annotations[0].category_id", "must be an int, got 1.0")
    bad_box = _ann(bbox=["4", 4, 10, 8])
    _fails(_record(bad_box), "annotations[0].bbox", "must be a list of numbers, got ['4', 4, 10")
    _fails(_record(height="32"), "height", "must be a positive int, got '32'")
    _fails(_record(_ann(iscrowd=2)), "annotations[0].iscrowd", "must be 0 or 1, got 2")
    _fails(_record(annotations=None), "annotations", "missing; training needs a list")
    assert CHECKER.check(_record(height=32.0, width=np.int64(32))) == []  # integral values pass


# ---------------------------------------------------------------- through the loader


def _cfg(name="unused", mask_on=True, **options):
    cfg = add_data_validation_config(get_cfg())
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    for key, value in options.items():
        cfg.DATALOADER.MRCNN[key] = value
    return cfg


def _register(name, records, path):
    records = [dict(r, file_name=path) for r in records]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    return name


def _nine_good_one_nan(tmp_path):
    path = str(tmp_path / "img.png")
    Image.new("RGB", (SIZE, SIZE)).save(path)
    records = [_record(image_id=i) for i in range(9)]
    records.append(_record(_ann(bbox=[4, 4, math.nan, 8]), image_id=9))
    return _register("bad_records_nan", records, path), path


def test_strict_loading_names_record_field_and_data_set(tmp_path):
    name, path = _nine_good_one_nan(tmp_path)
    with pytest.raises(BadRecordError) as info:
        load_validated_train_records(_cfg(name))
    message = str(info.value)
    assert message.startswith(f"{path} (image_id 9): annotations[0].bbox: contains NaN")
    assert f"[data set '{name}']" in message and "SKIP_BAD_RECORDS" in message


def test_skipping_counts_and_logs_bad_records(tmp_path, caplog):
    name, path = _nine_good_one_nan(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mrcnn_plugin.data.train_loader"):
        train = load_validated_train_records(
            _cfg(name, SKIP_BAD_RECORDS=True, MAX_BAD_FRACTION=0.1)
        )
    assert len(train.records) == 9 and train.num_loaded == 10 and len(train.skipped) == 1
    assert "Skipping 1 bad training records" in caplog.text
    assert f"{path} (image_id 9): annotations[0].bbox: contains NaN" in caplog.text


def test_skipping_past_the_limit_stops_the_run(tmp_path):
    name, _ = _nine_good_one_nan(tmp_path)
    cfg = _cfg(name, SKIP_BAD_RECORDS=True, MAX_BAD_FRACTION=0.05)
    with pytest.raises(TooManyBadRecordsError, match=r"1 of 10 \(10.00%\) training records"):
        load_validated_train_records(cfg)
    cfg = _cfg(name, SKIP_BAD_RECORDS=True, MAX_BAD_FRACTION=1.0, MAX_BAD_RECORDS=0)
    with pytest.raises(TooManyBadRecordsError, match="MAX_BAD_RECORDS = 0"):
        load_validated_train_records(cfg)


@pytest.mark.parametrize("filter_empty", [True, False])
def test_image_without_annotations_follows_filter_empty_annotations(tmp_path, filter_empty):
    path = str(tmp_path / "img.png")
    Image.new("RGB", (SIZE, SIZE)).save(path)
    name = _register("bad_records_empty", [_record(), _record(annotations=[], image_id=8)], path)
    cfg = _cfg(name)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    train = load_validated_train_records(cfg)
    assert [r["image_id"] for r in train.records] == ([7] if filter_empty else [7, 8])
    mapper = ValidatingDatasetMapper(cfg, is_train=True)
    counts = [len(mapper(r)["instances"]) for r in train.records]
    assert counts == ([1] if filter_empty else [1, 0])


def test_mapper_checks_records_against_the_decoded_image(tmp_path):
    path = str(tmp_path / "img.png")
    Image.new("RGB", (SIZE, SIZE)).save(path)
    mapper = ValidatingDatasetMapper(_cfg(), is_train=True)
    # No height/width in the record: the box is checked against the decoded 32x32 image.
    record = {"file_name": path, "annotations": [_ann(bbox=[4, 40, 10, 8])]}
    with pytest.raises(BadRecordError, match=f"^{path}: annotations\\[0\\].bbox: .* outside"):
        mapper(record)
    good = mapper({"file_name": path, "annotations": [_ann()]})
    assert good["instances"].gt_classes.tolist() == [1] and good["height"] == SIZE
