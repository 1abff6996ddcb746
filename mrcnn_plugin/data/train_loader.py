"""A training data loader that names bad data, and skips it only when asked to.

:func:`build_validated_train_loader` is detectron2's ``build_detection_train_loader(cfg)`` with:

1. every record of every ``DATASETS.TRAIN`` data set checked up front
   (:class:`~mrcnn_plugin.data.validation.RecordChecker`); a data set that fails to load is
   named with its annotation file;
2. images checked while mapping (:class:`~mrcnn_plugin.data.mapper.ValidatingDatasetMapper`),
   since decoding every image at start-up would take as long as an epoch;
3. by default the first bad record stops the run with an error naming the image, the field and
   the annotation file. With ``DATALOADER.MRCNN.SKIP_BAD_RECORDS`` bad records are skipped,
   logged and counted instead, and the run stops with :class:`TooManyBadRecordsError` once more
   than ``MAX_BAD_FRACTION`` of the loaded records (or more than ``MAX_BAD_RECORDS``, when
   >= 0) are bad. Each training process counts its own (per rank).

A record found bad while mapping is replaced by the next good record in the list: the mapper
never returns None, whose retry path in detectron2 v0.6 fails on Python 3.11.
"""

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode as CN
from detectron2.data import (
    DatasetCatalog,
    DatasetFromList,
    MetadataCatalog,
    build_detection_train_loader,
)
from detectron2.data.build import (
    filter_images_with_few_keypoints,
    filter_images_with_only_crowd_annotations,
    load_proposals_into_dataset,
    print_instances_class_histogram,
)
from detectron2.data.detection_utils import check_metadata_consistency

from .mapper import ValidatingDatasetMapper
from .validation import (
    BadDatasetError,
    BadRecordError,
    RecordChecker,
    TooManyBadRecordsError,
    describe_record,
    first_lines,
    fraction_text,
)

__all__ = [
    "BadRecordBudget",
    "BadRecordSkipper",
    "TrainRecords",
    "add_data_validation_config",
    "build_validated_train_dataset",
    "build_validated_train_loader",
    "load_validated_train_records",
]

logger = logging.getLogger(__name__)

# Key stamped on each loaded record: its index in the list, so a skipped one can be marked.
INDEX_KEY = "mrcnn_record_index"
_DEFAULTS = {"SKIP_BAD_RECORDS": False, "MAX_BAD_FRACTION": 0.01, "MAX_BAD_RECORDS": -1}


def add_data_validation_config(cfg):
    """Adds ``cfg.DATALOADER.MRCNN`` (bad-record handling) in place, unless already there."""
    if "MRCNN" not in cfg.DATALOADER:
        node = cfg.DATALOADER.MRCNN = CN()
        # False: the first bad record (image or annotation) stops training, named in the error.
        node.SKIP_BAD_RECORDS = _DEFAULTS["SKIP_BAD_RECORDS"]
        # With SKIP_BAD_RECORDS: stop once more than this fraction of the records is bad ...
        node.MAX_BAD_FRACTION = _DEFAULTS["MAX_BAD_FRACTION"]
        # ... or more than this many (-1: no count limit).
        node.MAX_BAD_RECORDS = _DEFAULTS["MAX_BAD_RECORDS"]
    return cfg


def _option(cfg, key: str):
    node = cfg.DATALOADER.get("MRCNN", None)
    return node.get(key, _DEFAULTS[key]) if node is not None else _DEFAULTS[key]


@dataclass
class BadRecordBudget:
    """How many bad records a run may skip: more than ``max_fraction`` of ``total`` or more
    than ``max_count`` (when >= 0) stops it."""

    total: int
    max_fraction: float = 0.01
    max_count: int = -1

    @classmethod
    def from_config(cls, cfg, total: int) -> "BadRecordBudget":
        return cls(total, _option(cfg, "MAX_BAD_FRACTION"), _option(cfg, "MAX_BAD_RECORDS"))

    def exceeded(self, num_bad: int) -> bool:
        over_count = 0 <= self.max_count < num_bad
        return over_count or num_bad > self.max_fraction * self.total

    def error(self, num_bad: int, examples: List[str]) -> TooManyBadRecordsError:
        limits = f"DATALOADER.MRCNN.MAX_BAD_FRACTION = {self.max_fraction}"
        if self.max_count >= 0:
            limits += f", MAX_BAD_RECORDS = {self.max_count}"
        return TooManyBadRecordsError(
            f"{fraction_text(num_bad, self.total)} training records are bad, more than "
            f"{limits} allows; fix or remove them:\n{first_lines(examples)}"
        )


@dataclass
class TrainRecords:
    """The checked training records and where each came from."""

    records: List[dict]
    source_ids: np.ndarray  # (len(records),) index into ``sources``
    sources: List[str]  # "data set 'x' (annotation file y)"
    num_loaded: int  # records before skipping and detectron2's filters
    skipped: List[str] = field(default_factory=list)  # messages of the records skipped


def describe_dataset(name: str) -> str:
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f"data set '{name}'" + (f" (annotation file {json_file})" if json_file else "")


def _load(name: str, source: str) -> list:
    try:
        dicts = DatasetCatalog.get(name)
    except Exception as e:
        raise BadDatasetError(f"{source}: could not be loaded: {type(e).__name__}: {e}") from e
    if not isinstance(dicts, list):
        raise BadDatasetError(f"{source}: must be a list of dicts, got {type(dicts).__name__}")
    if not dicts:
        raise BadDatasetError(f"{source}: is empty")
    return dicts


def load_validated_train_records(cfg, checker: Optional[RecordChecker] = None) -> TrainRecords:
    """``get_detection_dataset_dicts(cfg.DATASETS.TRAIN, ...)`` with every record checked.

    The same detectron2 filters run afterwards (images without non-crowd annotations when
    DATALOADER.FILTER_EMPTY_ANNOTATIONS, too few keypoints), and the same class histogram.

    Raises:
        BadRecordError: the first bad record, when not skipping (the message counts the rest).
        TooManyBadRecordsError: skipping, and the bad records are over the budget.
    """
    checker = checker or RecordChecker.from_config(cfg)
    skip = _option(cfg, "SKIP_BAD_RECORDS")
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise BadDatasetError("DATASETS.TRAIN is empty")
    proposal_files = cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None
    min_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
    min_keypoints = min_keypoints if cfg.MODEL.KEYPOINT_ON else 0
    out = TrainRecords([], np.zeros(0, dtype=np.int32), [], 0)
    errors, notes, source_ids = [], [], []
    for k, name in enumerate(names):
        source = describe_dataset(name)
        dicts = _load(name, source)
        if proposal_files:
            dicts = load_proposals_into_dataset(dicts, proposal_files[k])
        out.num_loaded += len(dicts)
        good = []
        for record in dicts:
            try:
                notes.extend(checker.check(record))
            except BadRecordError as e:
                errors.append(f"{e} [{source}]")
                continue
            good.append(record)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            good = filter_images_with_only_crowd_annotations(good)
        if min_keypoints > 0:
            good = filter_images_with_few_keypoints(good, min_keypoints)
        out.records.extend(good)
        source_ids.extend([k] * len(good))
        out.sources.append(source)
    out.source_ids = np.asarray(source_ids, dtype=np.int32)

    if errors and not skip:
        more = f"\n(and {len(errors) - 1} more bad records)" if len(errors) > 1 else ""
        raise BadRecordError(
            f"{errors[0]}{more}\nFix the data, or set DATALOADER.MRCNN.SKIP_BAD_RECORDS True "
            "to skip bad records (up to DATALOADER.MRCNN.MAX_BAD_FRACTION of them)."
        )
    if errors:
        out.skipped = errors
        logger.warning(f"Skipping {len(errors)} bad training records:\n{first_lines(errors)}")
        budget = BadRecordBudget.from_config(cfg, out.num_loaded)
        if budget.exceeded(len(errors)):
            raise budget.error(len(errors), errors)
    if notes:
        logger.warning(
            f"{len(notes)} annotations have zero-area boxes; detectron2 drops them when "
            f"mapping:\n{first_lines(notes, 3)}"
        )
    if not out.records:
        raise BadDatasetError(f"no usable training records in {', '.join(out.sources)}")
    try:
        class_names = MetadataCatalog.get(names[0]).thing_classes
        check_metadata_consistency("thing_classes", names)
        print_instances_class_histogram(out.records, class_names)
    except AttributeError:  # no class names registered for this data set
        pass
    # Shallow copies: the data set's own dicts stay unstamped.
    out.records = [{**r, INDEX_KEY: i} for i, r in enumerate(out.records)]
    return out


class BadRecordSkipper:
    """Wraps a mapper: a :class:`BadRecordError` it raises is re-raised naming the data set,
    or, when skipping, logged and counted, and the next good record is mapped instead.

    Records are marked bad in a shared-memory tensor, so DataLoader workers see each other's
    finds and the count in the main process is the workers' total.
    """

    def __init__(
        self,
        mapper,
        dataset: DatasetFromList,
        train: TrainRecords,
        *,
        skip: bool = False,
        budget: Optional[BadRecordBudget] = None,
    ):
        self.mapper = mapper
        self.dataset = dataset
        self.source_ids = train.source_ids
        self.sources = train.sources
        self.skip = skip
        self.budget = budget or BadRecordBudget(train.num_loaded)
        self.num_skipped_at_load = len(train.skipped)
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    @property
    def num_bad(self) -> int:
        """Bad records so far: skipped when loading + found while mapping (all workers)."""
        return self.num_skipped_at_load + int(self.bad.sum())

    def __call__(self, record: dict):
        record = dict(record)
        index = record.pop(INDEX_KEY)
        for _ in range(len(self.dataset)):
            if not self.bad[index]:
                try:
                    return self.mapper(record)
                except BadRecordError as e:
                    error = type(e)(f"{e} [{self.sources[self.source_ids[index]]}]")
                    if not self.skip:
                        raise error from e
                    self._mark_bad(index, str(error))
                except Exception as e:
                    if hasattr(e, "add_note"):  # Python >= 3.11
                        e.add_note(f"while mapping training record {describe_record(record)}")
                    raise
            index = (index + 1) % len(self.dataset)
            record = dict(self.dataset[index])
            record.pop(INDEX_KEY)
        raise TooManyBadRecordsError(f"all {len(self.dataset)} training records are bad")

    def _mark_bad(self, index: int, message: str) -> None:
        self.bad[index] = True
        num_bad = self.num_bad
        logger.warning(
            f"Skipping bad training record ({fraction_text(num_bad, self.budget.total)} "
            f"bad so far): {message}"
        )
        if self.budget.exceeded(num_bad):
            raise self.budget.error(num_bad, [message])


def build_validated_train_dataset(cfg, mapper=None) -> Tuple[DatasetFromList, BadRecordSkipper]:
    """The checked records as a ``DatasetFromList`` and the mapper to give
    ``build_detection_train_loader`` with them (``mapper`` default:
    ``ValidatingDatasetMapper(cfg, is_train=True)``)."""
    train = load_validated_train_records(cfg)
    dataset = DatasetFromList(train.records, copy=False)
    mapper = mapper if mapper is not None else ValidatingDatasetMapper(cfg, is_train=True)
    skipper = BadRecordSkipper(
        mapper,
        dataset,
        train,
        skip=_option(cfg, "SKIP_BAD_RECORDS"),
        budget=BadRecordBudget.from_config(cfg, train.num_loaded),
    )
    return dataset, skipper


def build_validated_train_loader(cfg, mapper=None, *, wrap_sampler=None):
    """detectron2's ``build_detection_train_loader(cfg)`` on checked records, with bad-record
    handling set by ``cfg.DATALOADER.MRCNN`` (see the module docstring). The sampler, batch
    size, aspect-ratio grouping and workers come from ``cfg`` as in detectron2;
    ``wrap_sampler(sampler)``, when given, returns the sampler to use in place of the one
    detectron2 chose (resuming uses it to start the index stream where a run stopped)."""
    dataset, skipper = build_validated_train_dataset(cfg, mapper)
    if wrap_sampler is None:
        return build_detection_train_loader(cfg, mapper=skipper, dataset=dataset)
    kwargs = build_detection_train_loader.from_config(cfg, mapper=skipper, dataset=dataset)
    kwargs["sampler"] = wrap_sampler(kwargs["sampler"])
    return build_detection_train_loader(**kwargs)
