"""Files the tools read never run code from them, and a file that cannot be used ends a tool
with one line naming it.

Hostile payloads in every format the tools accept: ``.pkl`` (Detectron2 model-zoo dict and
Detectron1 blobs), ``.pth`` (torch.save of an object whose ``__reduce__`` runs code), YAML with
``!!python/object/apply`` (top-level, and as the value of a real key, in the file and in a
``_BASE_``), and a ``last_checkpoint`` naming a hostile file under ``--resume``. The console
scripts run in subprocesses; each must exit 2 with one ``mrcnn-<tool>: error:`` line naming the
file, and the marker file a payload would create must not appear.
"""

import io
import os
import pickle
import re
import subprocess
import sys
import tokenize
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mrcnn_plugin.checkpoint import CheckpointReadError, UnsafeCheckpointError, read_checkpoint
from mrcnn_plugin.cli.common import reports_bad_input
from mrcnn_plugin.config import ConfigError, build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SHAPES = os.path.join(ROOT, "configs", "Synthetic", "mask_rcnn_R_18_FPN_shapes.yaml")
CPU = ["MODEL.DEVICE", "cpu"]


class RunsShell:
    """Unpickling this runs ``touch marker`` (os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    """Unpickling this creates ``marker`` (open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


SHELL = f"{os.system.__module__}.system"  # posix.system
OPEN = f"{open.__module__}.open"  # io.open


def _pkl(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    return str(path)


def _zoo_pkl(path, payload):  # Detectron2 model-zoo layout
    model = {"backbone.stem.conv1.weight": np.zeros((2, 3, 1, 1), np.float32), "x": payload}
    return _pkl(path, {"model": model, "__author__": "someone", "matching_heuristics": True})


def _blobs_pkl(path, payload):  # Detectron1 / Caffe2 layout
    return _pkl(path, {"blobs": {"conv1_w": np.zeros((2, 3, 1, 1), np.float32), "x": payload}})


def _pth(path, payload, **kwargs):
    torch.save({"model": {"a": torch.zeros(2)}, "extra": payload}, str(path), **kwargs)
    return str(path)


def _yaml(path, text):
    path.write_text(text)
    return str(path)


TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def _yaml_payloads(folder, marker):
    """{kind: (config file, file the error must name, line of the tag)}."""
    tag = TAG.format(marker=marker)
    top = _yaml(folder / "top.yaml", f"{tag}\n")
    key = _yaml(folder / "key.yaml", f"_BASE_: {SHAPES}\nSOLVER:\n  MAX_ITER: {tag}\n")
    base_top = _yaml(folder / "base_top.yaml", f"{tag}\n")
    base_key = _yaml(folder / "base_key.yaml", f"_BASE_: {SHAPES}\nMODEL:\n  WEIGHTS: {tag}\n")
    return {
        "top": (top, top, 1),
        "key": (key, key, 3),
        "base_top": (_yaml(folder / "child_top.yaml", "_BASE_: base_top.yaml\n"), base_top, 1),
        "base_key": (_yaml(folder / "child_key.yaml", "_BASE_: base_key.yaml\n"), base_key, 3),
    }


# ---- the console scripts, in subprocesses (run concurrently: each is mostly start-up) ----


def _cases(tmp, marker):
    """{name: (argv, [strings the error line must contain])}."""
    evil_zoo = _zoo_pkl(tmp / "zoo.pkl", RunsShell(marker))
    evil_blobs = _blobs_pkl(tmp / "blobs.pkl", OpensFile(marker))
    evil_pth = _pth(tmp / "evil.pth", RunsShell(marker))
    resume_dir = tmp / "run"
    resume_dir.mkdir()
    (resume_dir / "last_checkpoint").write_text(evil_blobs)  # an absolute path: outside the run
    yamls = _yaml_payloads(tmp, marker)
    images = tmp / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    not_zip = _yaml(tmp / "not_zip.pth", "these are not weights\n")
    empty = _yaml(tmp / "empty.yaml", "# nothing but a comment\n")
    metrics = str(tmp / "metrics.json")
    with open(metrics, "wb") as f:
        f.write(bytes(range(256)) * 8)
    demo = ["mrcnn-demo", "--input", str(images), "--output", str(tmp / "out"), "--config-file"]
    export = ["mrcnn-export", "--format", "torchscript", "--output", str(tmp / "out"),
              "--sample-image", str(images / "a.png"), "--config-file"]  # fmt: skip
    train = ["mrcnn-train", "--eval-only", "--config-file"]
    missing_yaml, missing_pth = str(tmp / "nope.yaml"), str(tmp / "nope.pth")
    # fmt: off
    return {  # payloads, then bad files
        "zoo_pkl_train": ([*train, SHAPES, "MODEL.WEIGHTS", evil_zoo, *CPU], [evil_zoo, SHELL]),
        "blobs_pkl_resume": (["mrcnn-train", "--resume", "--config-file", SHAPES,
                              "OUTPUT_DIR", str(resume_dir), *CPU], [evil_blobs, OPEN]),
        "pth_demo": ([*demo, SHAPES, "--opts", "MODEL.WEIGHTS", evil_pth, *CPU], [evil_pth, SHELL]),
        "yaml_top_train": ([*train, yamls["top"][0]], [yamls["top"][1], "line 1", "!!python"]),
        "yaml_key_demo": ([*demo, yamls["key"][0]], [yamls["key"][1], "line 3", "!!python"]),
        "yaml_base_key_export": ([*export, yamls["base_key"][0]],
                                 [yamls["base_key"][1], "line 3", "!!python"]),
        "pth_not_zip": ([*demo, SHAPES, "--opts", "MODEL.WEIGHTS", not_zip, *CPU], [not_zip]),
        "empty_yaml": ([*train, empty], [empty, "empty"]),
        "binary_metrics": (["mrcnn-plot-metrics", metrics], [metrics]),
        "missing_config": ([*export, missing_yaml], [missing_yaml]),
        "missing_weights": ([*train, SHAPES, "MODEL.WEIGHTS", missing_pth, *CPU], [missing_pth]),
    }
    # fmt: on


CASES = ["zoo_pkl_train", "blobs_pkl_resume", "pth_demo", "yaml_top_train", "yaml_key_demo",
         "yaml_base_key_export", "pth_not_zip", "empty_yaml", "binary_metrics", "missing_config",
         "missing_weights"]  # fmt: skip


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory):
    """{case: (argv, needles, CompletedProcess)} and the marker every payload would create."""
    tmp = tmp_path_factory.mktemp("untrusted")
    marker = tmp / "MARKER"
    cases = _cases(tmp, marker)
    assert sorted(cases) == sorted(CASES)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def run(argv):
        return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], cwd=str(tmp), env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(cases, pool.map(run, [argv for argv, _ in cases.values()])))
    return {k: (*cases[k], procs[k]) for k in cases}, marker


@pytest.mark.parametrize("case", CASES)
def test_tool_refuses_with_one_line(tool_runs, case):
    runs, marker = tool_runs
    argv, needles, proc = runs[case]
    output = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith(argv[0] + ": error:")]
    assert len(errors) == 1, output
    assert proc.stderr.rstrip().endswith(errors[0]), output  # the error is the last word
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not marker.exists(), f"{case}: the payload ran"


# ---- the loaders themselves, in process ----


@pytest.mark.parametrize("kind", ["top", "key", "base_top", "base_key"])
def test_yaml_python_tags_are_refused(tmp_path, kind):
    marker = tmp_path / "MARKER"
    config, named, line = _yaml_payloads(tmp_path, marker)[kind]
    with pytest.raises(ConfigError) as error:
        build_cfg(config)
    message = str(error.value)
    assert f"config file {named}, line {line}" in message and "!!python/object/apply" in message
    assert "\n" not in message and not marker.exists()


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda p, m: _zoo_pkl(p / "w.pkl", RunsShell(m)), SHELL),
        (lambda p, m: _blobs_pkl(p / "w.pkl", OpensFile(m)), OPEN),
        (lambda p, m: _pkl(p / "w.pkl", RunsShell(m)), SHELL),  # the payload is the file
        (lambda p, m: _pth(p / "w.pth", RunsShell(m)), SHELL),
        (lambda p, m: _pth(p / "w.pth", OpensFile(m), _use_new_zipfile_serialization=False), OPEN),
    ],
    ids=["zoo_pkl", "blobs_pkl", "bare_pkl", "pth_zip", "pth_legacy"],
)
def test_checkpoint_payloads_are_refused(tmp_path, make, refused):
    marker = tmp_path / "MARKER"
    path = make(tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert path in message and refused in message and "\n" not in message
    assert not marker.exists()


def test_trainer_checkpointer_refuses_hostile_weights(tmp_path):
    # MRCNNTrainer.resume_or_load(resume=False) loads MODEL.WEIGHTS through this checkpointer.
    from mrcnn_plugin.engine.checkpointer import SafeCheckpointer

    marker = tmp_path / "MARKER"
    path = _zoo_pkl(tmp_path / "w.pkl", RunsShell(marker))
    with pytest.raises(UnsafeCheckpointError, match="w.pkl"):
        SafeCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).resume_or_load(path, resume=False)
    assert not marker.exists()


def test_unreadable_checkpoints_name_the_file(tmp_path):
    good = _pth(tmp_path / "good.pth", 1)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(good, "rb").read()[:200])
    cases = {
        truncated: "torch.save",
        tmp_path / "empty.pth": "torch.save",
        tmp_path / "text.pkl": "pickle",
        tmp_path / "list.pth": "holds a list",
    }
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pkl").write_text("no pickle here")
    torch.save([torch.zeros(1)], str(tmp_path / "list.pth"))
    for path, words in cases.items():
        with pytest.raises(CheckpointReadError) as error:
            read_checkpoint(str(path))
        message = str(error.value)
        assert str(path) in message and words in message and "\n" not in message, message
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    assert read_checkpoint(good)["extra"] == 1


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "is empty"),
        ("- a\n- b\n", "holds a YAML list"),
        ("SOLVER: [1,\n", "line 2: not valid YAML"),
        (f"_BASE_: {SHAPES}\nSOLVER:\n  MAX_ITERS: 3\n", "unknown config key SOLVER.MAX_ITERS"),
        ("SOLVER:\n  MAX_ITER: many\n", "SOLVER.MAX_ITER"),
        ("_BASE_: [1]\n", "_BASE_ must be"),
        ("_BASE_: self.yaml\n", "_BASE_ cycle"),
        ("a: &a [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdef", "bcdefg")), "more than"),  # 10**7 entries expanded
    ],
    ids=["empty", "list", "broken", "unknown", "type", "base_type", "cycle", "aliases"],
)  # fmt: skip
def test_bad_config_files_name_the_file(tmp_path, text, words):
    path = _yaml(tmp_path / "self.yaml", text)
    with pytest.raises(ConfigError) as error:
        build_cfg(path)
    message = str(error.value)
    assert path in message and words in message and "\n" not in message, message


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    base = _yaml(tmp_path / "base.yaml", f"_BASE_: {SHAPES}\nMODEL:\n  MASK_ON_: true\n")
    child = _yaml(tmp_path / "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {base} (through _BASE_ of")):
        build_cfg(child)
    with pytest.raises(ConfigError, match="did you mean SOLVER.MAX_ITER"):
        build_cfg(SHAPES, ["SOLVER.MAX_ITERS", "3"])


def test_every_project_config_loads_as_detectron2_merges_it():
    """The safe loader resolves _BASE_ as fvcore does: same cfg as merge_from_file."""
    from detectron2.config import get_cfg

    from mrcnn_plugin import add_mrcnn_config

    configs = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(os.path.join(ROOT, "configs"))
        for name in names
        if name.endswith(".yaml")
    ]
    assert len(configs) >= 30
    for path in configs:
        reference = add_mrcnn_config(get_cfg())
        reference.merge_from_file(path, allow_unsafe=False)
        assert build_cfg(path) == reference, path


def test_reports_bad_input_prints_one_line_and_exits_2(capsys):
    @reports_bad_input("mrcnn-x")
    def main(argv=None):
        raise argv

    with pytest.raises(SystemExit) as stop:
        main(ConfigError("config file a.yaml, line 3: refusing"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "mrcnn-x: error: config file a.yaml, line 3: refusing\n"
    with pytest.raises(KeyError):  # not about the input: a bug, which keeps its traceback
        main(KeyError("x"))


# ---- no loader in the sources that could run code ----

FORBIDDEN = {
    "pickle.load(s)": r"\b(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\.(loads?|open)\(",
    "yaml unsafe loading": r"\byaml\.(unsafe_load|full_load|load_all|unsafe_load_all)\b",
    "yaml.load without SafeLoader": r"\byaml\.load\((?![^()]*Loader=yaml\.C?SafeLoader)",
    "weights_only=False": r"\bweights_only\s*=\s*False",
    "allow_pickle=True": r"\ballow_pickle\s*=\s*True",
    "allow_unsafe=True": r"\ballow_unsafe\s*=\s*True",
    "eval/exec/compile": r"(?<![\w.])(eval|exec|compile|__import__)\(",
    "merge_from_file, unsafe by default": r"\.merge_from_file\((?![^()]*allow_unsafe=False)",
    "LazyConfig.load (runs Python)": r"\bLazyConfig\.load\(",
}  # fmt: skip


def _code_only(source: str) -> str:
    """``source`` with comments and string literals blanked (docstrings may name the calls)."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    chars = list(source)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            begin = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            chars[begin:end] = [c if c == "\n" else " " for c in chars[begin:end]]
    return "".join(chars)


def _torch_loads_without_weights_only(code: str):
    for match in re.finditer(r"\btorch\.load\(", code):
        depth, end = 1, match.end()
        while depth and end < len(code):
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        if not re.search(r"weights_only\s*=\s*True", code[match.end() : end]):
            yield code[match.start() : end]


def find_unsafe_loads(source: str):
    """[(rule, text)] of the calls in ``source`` that could run code from a file."""
    code = _code_only(source)
    found = [(rule, m.group(0)) for rule, rx in FORBIDDEN.items() for m in re.finditer(rx, code)]
    return found + [("torch.load without weights_only=True", t)
                    for t in _torch_loads_without_weights_only(code)]  # fmt: skip


UNSAFE_EXAMPLES = [
    "pickle.load(f)", "pickle.loads(b)", "yaml.unsafe_load(s)", "yaml.load(s)",
    "yaml.load(s, Loader=yaml.Loader)", "yaml.full_load(s)", "torch.load(p)",
    "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)", "eval('1')",
    "exec(c)", "cfg.merge_from_file(p)", "cfg.merge_from_file(p, allow_unsafe=True)",
    "LazyConfig.load(p)",
]  # fmt: skip
SAFE_EXAMPLES = [
    "yaml.safe_load(s)", "yaml.load(s, Loader=yaml.SafeLoader)", "model.eval()",
    "torch.load(p, map_location='cpu', weights_only=True)", "ast.literal_eval(s)",
    "cfg.merge_from_file(p, allow_unsafe=False)", "re.compile(r)",
    '"""pickle.load(f) named in a docstring"""', "x = 1  # eval(s) in a comment",
]  # fmt: skip


@pytest.mark.parametrize("line", UNSAFE_EXAMPLES)
def test_the_scanner_finds_unsafe_loads(line):
    assert find_unsafe_loads(line + "\n"), line


def test_the_scanner_passes_safe_loads():
    assert find_unsafe_loads("\n".join(SAFE_EXAMPLES) + "\n") == []


def test_sources_have_no_unsafe_loads():
    found = []
    for top in ("mrcnn_plugin", "csrc_fallback", "tools"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        found += [(os.path.relpath(path, ROOT), *hit)
                                  for hit in find_unsafe_loads(f.read())]  # fmt: skip
    assert not found, "\n".join(map(str, found))
