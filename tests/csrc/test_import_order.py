"""detectron2._C is supplied by the mrcnn_plugin_csrc finder whatever the import order.

Each case runs in a fresh interpreter (the finder is installed by a .pth file at start-up);
the subprocesses run concurrently to keep the wall time down. With a working compiled
detectron2._C installed, the stand-in is still exercised: MRCNN_PLUGIN_CSRC_FALLBACK=force
makes the finder hand it out, and its results are compared with the compiled ops'.
"""

import importlib.machinery
import json
import os
import pathlib
import re
import subprocess
import sys

import detectron2
import pytest
import torch
from detectron2 import _C
from detectron2.layers import ROIAlignRotated, batched_nms_rotated, nms_rotated
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
from detectron2.structures import RotatedBoxes
from detectron2.structures import pairwise_iou_rotated as structures_iou

HAS_COMPILED_C = (
    importlib.machinery.PathFinder.find_spec("detectron2._C", detectron2.__path__) is not None
)
STAND_IN = getattr(_C, "IS_PURE_PYTORCH_STANDIN", False)

ORDERS = {
    "layers_first": "import detectron2.layers, detectron2.evaluation, detectron2.modeling",
    "evaluation_first": "import detectron2.evaluation, detectron2.modeling, detectron2.layers",
    "modeling_first": "import detectron2.modeling, detectron2.layers, detectron2.evaluation",
}
# Appended to the first case (one interpreter fewer): which module is detectron2._C?
CHECK_STAND_IN = (
    "; import detectron2._C as C, torch; "
    "assert C.__name__ == 'mrcnn_plugin_csrc.detectron2_c', C.__name__; "
    "assert C.IS_PURE_PYTORCH_STANDIN; "
    "assert callable(torch.ops.detectron2.nms_rotated); print('stand-in ok')"
)
# detectron2/__init__ is light, so this fails fast when nothing supplies the module.
FALLBACK_OFF = "import detectron2._C"
# Imports this module in a fresh interpreter to print run_rotated_layers() on the stand-in.
FORCED = (
    f"import json, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
    "from detectron2 import _C; assert _C.IS_PURE_PYTORCH_STANDIN, _C; "
    "from test_import_order import run_rotated_layers; print(json.dumps(run_rotated_layers()))"
)


def run_rotated_layers():
    """detectron2's public rotated-box layers on fixed random data, as JSON-able lists."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(40, 5, generator=gen) * torch.tensor([30.0, 30.0, 12.0, 12.0, 360.0]) + 1
    scores = torch.rand(40, generator=gen)
    classes = torch.randint(0, 3, (40,), generator=gen)
    features = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=gen), boxes], dim=1).double()
    pooled = ROIAlignRotated((3, 3), 0.5, 2)(features, rois)
    (grad,) = torch.autograd.grad(pooled.square().sum(), features)
    return {
        "iou": pairwise_iou_rotated(boxes, boxes).tolist(),
        "structures_iou": structures_iou(RotatedBoxes(boxes), RotatedBoxes(boxes[:7])).tolist(),
        "nms": nms_rotated(boxes, scores, 0.3).tolist(),
        "batched_nms": batched_nms_rotated(boxes, scores, classes, 0.3).tolist(),
        "pooled": pooled.tolist(),
        "grad": grad.tolist(),
    }


def _start(code, **env):
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def results():
    codes = dict(ORDERS)
    if STAND_IN:
        codes["layers_first"] += CHECK_STAND_IN
    procs = {name: _start(code) for name, code in codes.items()}
    if not HAS_COMPILED_C:
        procs["fallback_off"] = _start(FALLBACK_OFF, MRCNN_PLUGIN_CSRC_FALLBACK="0")
    procs["forced"] = _start(FORCED, MRCNN_PLUGIN_CSRC_FALLBACK="force")
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_any_import_order_works(results, order):
    code, _, stderr = results[order]
    assert code == 0, stderr[-2000:]


@pytest.mark.skipif(not STAND_IN, reason="a compiled detectron2._C loads and takes priority")
def test_c_module_is_the_stand_in(results):
    code, stdout, stderr = results["layers_first"]
    assert code == 0, stderr[-2000:]
    assert "stand-in ok" in stdout


@pytest.mark.skipif(HAS_COMPILED_C, reason="a compiled detectron2._C is installed")
def test_without_finder_import_fails(results):
    # Proves the finder is what supplies detectron2._C here.
    code, _, stderr = results["fallback_off"]
    assert code != 0
    assert "No module named 'detectron2._C'" in stderr


def test_forced_stand_in_runs_detectron2_rotated_layers(results):
    """detectron2's own rotated layers work on the stand-in and agree with the loaded _C."""
    code, stdout, stderr = results["forced"]
    assert code == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    env = run_rotated_layers()  # here, on whatever detectron2._C this process loaded
    assert got["iou"] == env["iou"] and got["structures_iou"] == env["structures_iou"]
    assert got["nms"] == env["nms"] and got["batched_nms"] == env["batched_nms"]
    assert 1 < len(got["nms"]) < 40
    for key in ("pooled", "grad"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(env[key]), atol=1e-9, rtol=0
        )


def _detectron2_sources():
    root = pathlib.Path(detectron2.__file__).parent
    return [p.read_text(encoding="utf-8") for p in root.rglob("*.py")]


def test_every_entry_point_detectron2_calls_exists():
    """Each ``_C.<name>`` and ``torch.ops.detectron2.<name>`` in the installed detectron2."""
    c_names, op_names = set(), set()
    for text in _detectron2_sources():
        op_names.update(re.findall(r"torch\.ops\.detectron2\.(\w+)", text))
        if re.search(r"from detectron2 import _C\b|import detectron2\._C as _C\b", text):
            c_names.update(re.findall(r"(?<![\w.])_C\.(\w+)", text))
    assert "nms_rotated" in op_names and "COCOevalAccumulate" in c_names  # the scan works
    missing = sorted(n for n in c_names if not hasattr(_C, n))
    assert not missing, f"detectron2._C lacks {missing}"
    for name in sorted(op_names):
        assert callable(getattr(torch.ops.detectron2, name)), name
