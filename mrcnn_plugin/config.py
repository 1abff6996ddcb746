"""The plugin's config keys. ``add_mrcnn_config`` is the only place they are defined.

Usage::

    cfg = get_cfg()
    add_mrcnn_config(cfg)
    cfg.merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")

Everything else (backbone depth, pooler resolution, sampling ratio, ...) uses detectron2's own
keys, so a plugin config reads like a detectron2 one. detectron2's global defaults are never
touched: the keys are added to the ``cfg`` passed in only.

Config files are untrusted input: ``build_cfg`` reads them (and every ``_BASE_`` they name) with
``yaml.safe_load`` only, where detectron2's ``merge_from_file`` falls back to
``yaml.unsafe_load`` (which runs the code of ``!!python/...`` tags). Every problem with a file
or an override is a :class:`ConfigError` whose one-line message names the file and the line or
key.
"""

import difflib
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager
from fvcore.common.config import BASE_KEY

from .data.train_loader import add_data_validation_config


def add_mrcnn_config(cfg):
    """Adds the ``MODEL.MRCNN`` node to ``cfg`` in place and returns it."""
    mrcnn = cfg.MODEL.MRCNN = CN()

    # RoI feature extraction (paper Table 2c/2d) of every branch whose POOLER_TYPE is set
    # (POOLER_TYPE "" means no pooler, as in detectron2; any other value is replaced by this op).
    # NAME is looked up in ROI_OP_REGISTRY: "MRCNNRoIAlign", "MRCNNRoIPool" or "MRCNNRoIWarp".
    # Resolution and sampling ratio come from each head's POOLER_RESOLUTION /
    # POOLER_SAMPLING_RATIO, as in detectron2.
    mrcnn.ROI_OP = CN()
    mrcnn.ROI_OP.NAME = "MRCNNRoIAlign"
    # Half-pixel shift of RoI coordinates (detectron2's ROIAlignV2). The paper's RoIAlign
    # is not aligned; detectron2's default is. RoIPool and RoIWarp need False.
    mrcnn.ROI_OP.ALIGNED = True
    # How the samples in a bin are combined: "avg" or "max" (RoIAlign and RoIWarp; RoIPool
    # needs "max").
    mrcnn.ROI_OP.AGGREGATION = "avg"
    # FPN level assignment (FPN paper eq. 1): k = floor(k0 + log2(sqrt(wh) / 224)).
    mrcnn.ROI_OP.CANONICAL_BOX_SIZE = 224
    mrcnn.ROI_OP.CANONICAL_LEVEL = 4
    # Per-branch overrides of NAME / ALIGNED / AGGREGATION: a key left at None takes the value
    # above, e.g. ROI_OP.KEYPOINT.NAME "MRCNNRoIPool" (with ALIGNED False, AGGREGATION "max")
    # changes only the keypoint branch (mrcnn_plugin.modeling.poolers.roi_op_of_head resolves
    # them). The C4 head pools once for all branches, so it takes only the BOX overrides.
    for branch in ("BOX", "MASK", "KEYPOINT"):
        mrcnn.ROI_OP[branch] = CN({"NAME": None, "ALIGNED": None, "AGGREGATION": None})

    # C4 head: stride of res5's first block. 2 is detectron2's design (14x14 RoIs into a
    # stride-2 res5); 1 is the paper's Fig. 4 (7x7 RoIs, res5 run at stride 1).
    mrcnn.RES5_FIRST_STRIDE = 2

    # Mask loss (Table 2b): "sigmoid" (per-class binary cross-entropy, the paper's) or
    # "softmax" (multinomial over classes per pixel).
    mrcnn.MASK_LOSS = "sigmoid"
    # Hidden fc widths of the MLP mask head (Table 2e), used by "MRCNNMLPMaskHead".
    mrcnn.MASK_MLP_DIMS = [1024, 1024]
    # Inference on the CPU (mrcnn_plugin/engine/inference_modes.py): "exact" (float32, same
    # results as detectron2), "fast" (bfloat16 where the CPU has it) or "quantized" (int8
    # backbone where it has VNNI/AMX). Training never uses it.
    mrcnn.INFERENCE_MODE = "exact"
    # Training data the project did not make: bad images/annotations (DATALOADER.MRCNN).
    add_data_validation_config(cfg)
    return cfg


def build_cfg(config_file: str, opts: Optional[List[str]] = None) -> CfgNode:
    """get_cfg() + the plugin's keys + ``config_file`` + ``opts`` (KEY VALUE ...); unfrozen.

    Raises:
        FileNotFoundError: ``config_file`` (or a ``_BASE_``) does not exist.
        ConfigError: anything else wrong with a file or an override (see ``merge_config_file``).
    """
    cfg = get_cfg()
    add_mrcnn_config(cfg)
    if config_file:
        merge_config_file(cfg, config_file)
    merge_overrides(cfg, opts or [])
    return cfg


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file (with the
    line, or the key)."""


# Beyond this many mapping/list entries (counted with YAML aliases expanded) a file is refused:
# a few nested aliases ("billion laughs") would otherwise expand into billions of CfgNodes.
MAX_CONFIG_ENTRIES = 100_000
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


def _yaml_error(path: str, error: yaml.YAMLError) -> ConfigError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"config file {path}" + (f", line {mark.line + 1}" if mark else "")
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    tag = re.search(r"tag '([^']+)'", problem)
    if isinstance(error, yaml.constructor.ConstructorError) and tag:
        name = tag.group(1).replace(_YAML_TAG_PREFIX, "!!")
        return ConfigError(
            f"{where}: refusing the YAML tag {name}: configs are read as plain YAML, "
            "never as Python objects"
        )
    return ConfigError(f"{where}: not valid YAML: {problem}")


def _count_entries(node, budget: int) -> int:
    """The budget left after counting the entries of ``node`` (stops below 0)."""
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        budget -= 1
        if budget < 0:
            return budget
        budget = _count_entries(child, budget)
    return budget


def read_config_yaml(path: str) -> Dict[str, Any]:
    """The mapping of one YAML config file (its ``_BASE_`` not followed), read with
    ``yaml.safe_load``. Raises FileNotFoundError or ConfigError naming ``path``."""
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    with PathManager.open(path, "rb") as f:  # bytes: yaml detects the encoding itself
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise _yaml_error(path, e) from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: a mapping of config keys is needed")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a YAML {type(data).__name__}, not a mapping of config keys"
        )
    if _count_entries(data, MAX_CONFIG_ENTRIES) < 0:
        raise ConfigError(f"config file {path}: more than {MAX_CONFIG_ENTRIES} entries")
    return data


def _base_files(path: str, data: Dict[str, Any]) -> List[str]:
    """The ``_BASE_`` files of ``path``, resolved as fvcore's ``load_yaml_with_base`` does:
    ``~`` expanded, relative paths taken relative to the folder of ``path``."""
    if BASE_KEY not in data:
        return []
    bases = data[BASE_KEY]
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of them")
    resolved = []
    for name in names:
        name = os.path.expanduser(name) if name.startswith("~") else name
        if not name.startswith(("/", "https://", "http://")):
            name = os.path.join(os.path.dirname(path), name)
        resolved.append(name)
    return resolved


def read_config_tree(path: str, _chain: Sequence[str] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """(file, mapping) of ``path`` and of every ``_BASE_`` it names, recursively, bases first;
    each read by :func:`read_config_yaml`. Raises FileNotFoundError or ConfigError."""
    chain = [*_chain, path]
    if os.path.abspath(path) in map(os.path.abspath, _chain):
        raise ConfigError(f"config file {_chain[0]}: {BASE_KEY} cycle {' -> '.join(chain)}")
    data = read_config_yaml(path)
    tree = []
    for base in _base_files(path, data):
        if "://" not in base and not os.path.isfile(base):
            raise FileNotFoundError(f"config file {path}: its {BASE_KEY} {base} not found")
        tree += read_config_tree(base, chain)
    return tree + [(path, data)]


def _parent_of(data, key: str):
    """The mapping that would hold the dotted ``key`` (None if there is none) and its last part."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    return (data if isinstance(data, dict) else None), last


def _sets(data, key: str) -> bool:
    parent, last = _parent_of(data, key)
    return parent is not None and last in parent


def _merge_error(cfg: CfgNode, error: Exception) -> Tuple[Optional[str], str]:
    """(the config key a yacs/fvcore merge failure is about, or None; its one-line reason)."""
    text = str(error.args[0]) if error.args else type(error).__name__
    unknown = re.search(r"Non-existent (?:config )?key: (\S+)", text)
    if unknown:
        key = unknown.group(1)
        parent, last = _parent_of(cfg, key)
        close = difflib.get_close_matches(last, list(parent)) if parent is not None else []
        hint = f" (did you mean {key[: -len(last)]}{close[0]}?)" if close else ""
        return key, f"unknown config key {key}{hint}"
    key = re.search(r"for config key: (\S+)", text)
    return (key.group(1) if key else None), (text.splitlines() or [repr(error)])[0]


def merge_config_file(cfg: CfgNode, path: str) -> None:
    """Merges the YAML config ``path`` into ``cfg`` without running code from it.

    ``path`` and its ``_BASE_`` files are first read with ``yaml.safe_load``
    (:func:`read_config_tree`): a ``!!python/...`` tag, invalid YAML, an empty file, a file that
    is not a mapping or a ``_BASE_`` cycle raise :class:`ConfigError` naming the file (and the
    line). Then detectron2's own ``merge_from_file(allow_unsafe=False)`` merges them (with its
    config-version upgrade); an unknown key or a value of the wrong type raises ConfigError
    naming the key and the file that sets it.
    """
    tree = read_config_tree(path)
    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        key, reason = _merge_error(cfg, e)
        # The file that sets the key: the last of the tree, as later files override earlier.
        setters = [p for p, data in tree if key and _sets(data, key)]
        where = setters[-1] if setters else path
        via = f" (through {BASE_KEY} of {path})" if where != path else ""
        raise ConfigError(f"config file {where}{via}: {reason}") from e


def merge_overrides(cfg: CfgNode, opts: Sequence[str]) -> None:
    """``cfg.merge_from_list(opts)`` (KEY VALUE pairs, values parsed as Python literals without
    evaluating code); a bad pair raises ConfigError naming the key."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"config override: {_merge_error(cfg, e)[1]}") from e
