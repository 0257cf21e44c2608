"""The package's layout shows the architecture, and its imports go one way:
command line -> tools -> API -> model and weights -> layers -> facts."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tfgcvit"

# Each module may import (at the top or inside a function) only modules of a lower rank.
RANKS = {
    # Facts and file formats: no other tfgcvit module.
    "config": 0,
    "data.images": 0, "data.preprocessing": 0,
    "weights.checkpoint": 0, "weights.download": 0, "weights.resize": 0,
    "model.tuning": 0,
    "model.layers": 1,  # the building blocks
    "weights.mapping": 2,  # the official <-> Keras weight mapping
    "weights.pretrained": 3,  # the registry of official checkpoints, their cache, loading weights
    "model.gcvit": 4,  # the graph builder and the Keras Applications API
    "hub": 5, "export": 5,  # keras-hub classes and presets; deployment
    "convert": 6, "benchmark": 6, "explain": 6,  # tools built on the API
    "cli": 7,  # the command line
    "__main__": 8,
}
# What each folder holds; its modules are named "folder.module" above.
FOLDERS = {
    "model": {"layers", "gcvit", "tuning"},
    "weights": {"checkpoint", "download", "mapping", "resize", "pretrained"},
    "data": {"images", "preprocessing"},
}


def _module_name(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _rank_of(imported):
    """The rank of a dotted module name under tfgcvit ("model.layers"), or None for a folder."""
    while imported and imported not in RANKS:
        imported = imported.rpartition(".")[0]
    return RANKS.get(imported)


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tfgcvit" or node.module.startswith("tfgcvit."):
                package = node.module.removeprefix("tfgcvit").removeprefix(".")
                for alias in node.names:
                    name = f"{package}.{alias.name}" if package else alias.name
                    if name in RANKS:  # a module: `from tfgcvit.model import layers`
                        yield name
                    elif package:  # a name of a module: `from tfgcvit.model.layers import MLP`
                        yield package
        elif isinstance(node, ast.Import):
            yield from (alias.name.removeprefix("tfgcvit.") for alias in node.names if alias.name.startswith("tfgcvit."))


def test_folders_hold_what_their_names_say():
    folders = {}
    for name in _modules():
        folder, _, module = name.rpartition(".")
        if folder:
            folders.setdefault(folder, set()).add(module)
    assert folders == FOLDERS
    for folder in FOLDERS:
        assert ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())), folder


def test_every_module_has_a_rank():
    modules = set(_modules()) - {""} - set(FOLDERS)
    assert modules == set(RANKS), sorted(modules ^ set(RANKS))


def test_imports_only_go_down():
    upward = []
    for name, path in _modules().items():
        if name == "" or name in FOLDERS:
            continue  # the package and folder __init__ files name their modules lazily, by strings
        for imported in set(_imported_modules(path)):
            rank = _rank_of(imported)
            if rank is None or rank >= RANKS[name]:
                upward.append(f"{name} imports {imported or 'tfgcvit'}")
    assert upward == []


def test_folder_init_files_import_nothing_eagerly():
    # The weight mapping imports tfgcvit.model.layers: were tfgcvit/model/__init__.py to import
    # the Applications API (which loads pretrained weights, which needs the mapping), the circle
    # would be back.
    for folder in FOLDERS:
        tree = ast.parse((PACKAGE / folder / "__init__.py").read_text())
        eager = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
                 and node.module.startswith("tfgcvit")]
        assert eager == [], folder


def test_every_module_imports_first_without_a_circle():
    # Each module imported first into a process holding no tfgcvit module: an import
    # circle (also one through a folder's lazy names) fails here with an ImportError.
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'tfgcvit' or m.startswith('tfgcvit.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('tfgcvit.' + name)\n"
    )
    modules = sorted(name for name in RANKS if name not in ("hub", "__main__"))  # hub: keras-hub is optional
    result = subprocess.run([sys.executable, "-c", script, *modules], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
