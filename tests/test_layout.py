"""The package's imports go one way: command line -> API -> model and weights -> layers -> facts."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tfgcvit"

# Each module may import (at the top or inside a function) only modules of a lower rank.
RANKS = {
    # Facts and file formats: no other tfgcvit module.
    "config": 0, "resize": 0, "checkpoint": 0, "download": 0, "images": 0, "preprocessing": 0,
    "tuning": 0,
    "layers": 1,  # the building blocks
    "weights": 2,  # the official <-> Keras weight mapping
    "pretrained": 3,  # the registry of official checkpoints, their cache, loading weights
    "model": 4,  # the graph builder and the Keras Applications API
    "hub": 5, "export": 5,  # keras-hub classes and presets; deployment
    "convert": 6, "benchmark": 6, "explain": 6,  # tools built on the API
    "cli": 7,  # the command line
    "__main__": 8,
}


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tfgcvit":
                yield from (alias.name for alias in node.names)
            elif node.module.startswith("tfgcvit."):
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tfgcvit."))


def test_every_module_has_a_rank():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(RANKS), sorted(modules - set(RANKS))


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue  # it names the public API lazily, by strings
        for imported in set(_imported_modules(path)):
            if imported in RANKS and RANKS[imported] >= RANKS[path.stem]:
                upward.append(f"{path.stem} imports {imported}")
    assert upward == []
