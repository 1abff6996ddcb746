"""The project uses detectron2's and fvcore's public API only, and its imports go one way.

A static scan (``ast``) of mrcnn_plugin/, csrc_fallback/ and tools/ flags:

- imports of ``_``-prefixed detectron2 / fvcore modules or names (``detectron2._C`` excepted:
  csrc_fallback provides that module);
- ``X._name`` where X was imported from detectron2 / fvcore (``comm._LOCAL_PROCESS_GROUP``);
- ``._name`` for attributes that detectron2 objects hold privately (``self._trainer``, ...);
- in the package's classes derived from detectron2 / fvcore ones: overriding, or reaching
  through ``self`` / ``cls`` / ``super()``, a ``_``-prefixed member of those bases (found by
  importing the class and walking its real MRO);
- assignments into detectron2 modules or classes, ``setattr``/``delattr`` on them, and
  ``super(<detectron2 class>, ...)``;
- imports against the layering ``cli -> library -> modeling -> layers``.

Each rule is first shown to fire on a small bad snippet, so a passing scan means something.
"""

import ast
import importlib
import os
from typing import Dict, List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("mrcnn_plugin", "csrc_fallback", "tools")
SKIPPED_DIRS = {"build", "__pycache__", ".eggs"}
UPSTREAM = ("detectron2", "fvcore")
PROVIDED_PRIVATE_MODULES = {"detectron2._C"}  # csrc_fallback *is* this module

# Private attributes of detectron2 objects that are set on instances (not visible on the class),
# or that plugins commonly reach for.
KNOWN_PRIVATE_ATTRIBUTES = {
    "_trainer", "_data_loader_iter", "_data_loader_iter_obj", "_write_metrics", "_hooks",
    "_last_eval_results", "_load_model", "_load_file", "_LOCAL_PROCESS_GROUP",
    "_shared_roi_transform", "_build_res5_block",
}  # fmt: skip

# Package layers, lowest first; a module may import its own layer or lower ones. Modules not
# listed (engine, export, data, config, checkpoint, ...) form the library layer.
LAYERS = {"layers": 0, "modeling": 1, "cli": 3}
LIBRARY_LAYER = 2


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_upstream(dotted: str) -> bool:
    return dotted.split(".")[0] in UPSTREAM


def _root_name(node: ast.AST) -> Optional[str]:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], LIBRARY_LAYER) if len(parts) > 1 else LIBRARY_LAYER


class Scanner(ast.NodeVisitor):
    """Collects problems of one source file; ``module`` is its dotted name inside the package
    (None for scripts), ``upstream_private`` maps class names to their bases' private names."""

    def __init__(self, path: str, module: Optional[str], upstream_private: Dict[str, Set[str]]):
        self.path, self.module, self.upstream_private = path, module, upstream_private
        self.imported: Dict[str, str] = {}  # local name -> detectron2 / fvcore origin
        self.problems: List[str] = []
        self.class_private: List[Set[str]] = []

    def flag(self, node, message):
        self.problems.append(f"{self.path}:{node.lineno}: {message}")

    def _check_module(self, node, dotted):
        if _is_upstream(dotted) and dotted not in PROVIDED_PRIVATE_MODULES:
            if any(_private(part) for part in dotted.split(".")):
                self.flag(node, f"imports private {dotted}")
        inside = self.module and self.module.startswith("mrcnn_plugin.")
        if inside and self.module != "mrcnn_plugin.__init__" and dotted.startswith("mrcnn_plugin."):
            if _layer(dotted) > _layer(self.module):
                self.flag(node, f"{self.module} imports {dotted}, a higher layer")

    def visit_Import(self, node):
        for alias in node.names:
            self._check_module(node, alias.name)
            if _is_upstream(alias.name):
                local = alias.asname or alias.name.split(".")[0]
                self.imported[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: resolve against the package of this module
            package = (self.module or "").split(".")[: -node.level]
            base = ".".join(package + ([node.module] if node.module else []))
        self._check_module(node, base)
        for alias in node.names:
            dotted = f"{base}.{alias.name}"
            if base == "mrcnn_plugin":  # the names may be submodules
                self._check_module(node, dotted)
            if _is_upstream(base):
                if _private(alias.name) and dotted not in PROVIDED_PRIVATE_MODULES:
                    self.flag(node, f"imports private {dotted}")
                self.imported[alias.asname or alias.name] = dotted

    def visit_ClassDef(self, node):
        private = self.upstream_private.get(node.name, set())
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in private:
                self.flag(item, f"{node.name} overrides detectron2's private {item.name}")
        self.class_private.append(private)
        self.generic_visit(node)
        self.class_private.pop()

    def visit_Attribute(self, node):
        if _private(node.attr):
            owner = node.value
            root = _root_name(owner)
            in_class = self.class_private[-1] if self.class_private else set()
            via_self = (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or (
                isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super"
            )
            if root in self.imported:
                self.flag(node, f"{root}.{node.attr}: private name of {self.imported[root]}")
            elif node.attr in KNOWN_PRIVATE_ATTRIBUTES:
                self.flag(node, f".{node.attr}: private attribute of detectron2 objects")
            elif via_self and node.attr in in_class:
                self.flag(node, f".{node.attr}: private member of a detectron2 base class")
        self.generic_visit(node)

    def _check_target(self, target):
        root = _root_name(target)
        if isinstance(target, ast.Attribute) and root in self.imported:
            self.flag(target, f"assigns into {self.imported[root]} ({ast.unparse(target)})")

    def visit_Assign(self, node):
        for target in node.targets:
            self._check_target(target)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._check_target(node.target)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = getattr(node.func, "id", None)
        if name in ("setattr", "delattr") and node.args:
            if _root_name(node.args[0]) in self.imported:
                self.flag(node, f"{name} on {ast.unparse(node.args[0])}, a detectron2 object")
        if name == "super" and node.args and _root_name(node.args[0]) in self.imported:
            self.flag(node, f"super({ast.unparse(node.args[0])}, ...) skips detectron2's MRO")
        self.generic_visit(node)


def _upstream_private_members(module: str) -> Dict[str, Set[str]]:
    """{class name: private members of its detectron2 / fvcore bases} for the module's classes."""
    found = {}
    for name, value in vars(importlib.import_module(module)).items():
        if isinstance(value, type) and value.__module__ == module:
            found[name] = {
                member
                for base in value.__mro__[1:]
                if _is_upstream(base.__module__)
                for member in vars(base)
                if _private(member)
            }
    return found


def scan_source(source: str, path: str = "<snippet>", module: Optional[str] = None,
                upstream_private: Optional[Dict[str, Set[str]]] = None) -> List[str]:  # fmt: skip
    scanner = Scanner(path, module, upstream_private or {})
    scanner.visit(ast.parse(source, filename=path))
    return scanner.problems


def _sources():
    for top in SCANNED:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), ROOT)


def _module_name(path: str) -> Optional[str]:
    """Dotted name of a package module (mrcnn_plugin, mrcnn_plugin_csrc), "__init__" kept so
    that relative imports resolve alike for packages and modules; None for scripts."""
    parts = path[: -len(".py")].split(os.sep)
    if parts[0] == "csrc_fallback":
        parts = parts[1:]
    return ".".join(parts) if parts[0] in ("mrcnn_plugin", "mrcnn_plugin_csrc") else None


BAD_SNIPPETS = {
    "from detectron2.utils import comm\ncomm._LOCAL_PROCESS_GROUP = None": "private name",
    "from detectron2.engine.train_loop import _log_api_usage": "imports private",
    "import fvcore.common._private_thing": "imports private",
    "from detectron2.engine import defaults\ndefaults.create_ddp_model = f": "assigns into",
    "import detectron2.engine.defaults\ndetectron2.engine.defaults.x = 1": "assigns into",
    "from detectron2.engine import defaults\nsetattr(defaults, 'x', 1)": "setattr on",
    "from detectron2.engine import DefaultTrainer\nsuper(DefaultTrainer, cls)": "super(",
    "def f(trainer):\n    return trainer._trainer": "private attribute",
    "def run(self):\n    next(self._data_loader_iter)": "private attribute",
}


@pytest.mark.parametrize("source", sorted(BAD_SNIPPETS))
def test_scanner_flags_each_rule(source):
    problems = scan_source(source)
    assert any(BAD_SNIPPETS[source] in p for p in problems), problems


def test_scanner_flags_private_base_members_and_layering():
    members = {"Heads": {"_init_box_head", "_forward_box"}}
    source = (
        "class Heads(StandardROIHeads):\n"
        "    @classmethod\n"
        "    def _init_box_head(cls, cfg):\n"
        "        return super()._init_box_head(cfg)\n"
        "    def _own_helper(self):\n"
        "        return self._forward_box(1), self._own_value\n"
    )
    problems = scan_source(source, upstream_private=members)
    assert len(problems) == 3, problems  # the override, super()._init_box_head, self._forward_box
    layering = "from ...cli.common import x\nfrom mrcnn_plugin import engine\n"
    problems = scan_source(layering, module="mrcnn_plugin.modeling.roi_heads.heads")
    assert len(problems) == 2 and all("higher layer" in p for p in problems), problems
    assert not scan_source("from ..cli import x", module="mrcnn_plugin.cli.demo")
    assert not scan_source("from . import cli", module="mrcnn_plugin.__init__")
    assert not scan_source("import detectron2._C\nfrom detectron2 import _C")


def test_sources_use_only_public_detectron2_api_and_one_way_imports():
    problems = []
    for path in _sources():
        module = _module_name(path)
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        members = _upstream_private_members(module.replace(".__init__", "")) if module else {}
        problems += scan_source(source, path, module, members)
    assert not problems, "\n" + "\n".join(problems)
