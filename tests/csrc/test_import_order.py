"""detectron2._C is supplied by the mrcnn_plugin_csrc finder whatever the import order.

Each case runs in a fresh interpreter (the finder is installed by a .pth file at start-up);
the subprocesses run concurrently to keep the wall time down.
"""

import importlib.machinery
import os
import subprocess
import sys

import detectron2
import pytest

HAS_COMPILED_C = (
    importlib.machinery.PathFinder.find_spec("detectron2._C", detectron2.__path__) is not None
)

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
    if not HAS_COMPILED_C:
        codes["layers_first"] += CHECK_STAND_IN
    procs = {name: _start(code) for name, code in codes.items()}
    if not HAS_COMPILED_C:
        procs["fallback_off"] = _start(FALLBACK_OFF, MRCNN_PLUGIN_CSRC_FALLBACK="0")
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_any_import_order_works(results, order):
    code, _, stderr = results[order]
    assert code == 0, stderr[-2000:]


@pytest.mark.skipif(HAS_COMPILED_C, reason="a compiled detectron2._C exists and takes priority")
def test_c_module_is_the_stand_in(results):
    code, stdout, stderr = results["layers_first"]
    assert code == 0, stderr[-2000:]
    assert "stand-in ok" in stdout


@pytest.mark.skipif(HAS_COMPILED_C, reason="a compiled detectron2._C exists and takes priority")
def test_without_finder_import_fails(results):
    # Proves the finder is what supplies detectron2._C here.
    code, _, stderr = results["fallback_off"]
    assert code != 0
    assert "No module named 'detectron2._C'" in stderr
