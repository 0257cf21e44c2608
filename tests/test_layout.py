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
    "model.forms": 0,
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
    "model": {"layers", "gcvit", "forms"},
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


def test_importing_the_package_changes_no_import_machinery():
    # A library that changes how the user's process imports other libraries is one users
    # distrust: `import tfgcvit` (and its lazy model names) installs no finder or hook.
    # Keras and TensorFlow first: importing them adds finders of their own (absl, six).
    script = (
        "import builtins, sys, keras\n"
        "def machinery():\n"
        "    return list(sys.meta_path), list(sys.path_hooks), builtins.__import__\n"
        "before = machinery()\n"
        "import tfgcvit\n"
        "assert machinery() == before, machinery()\n"
        "import tfgcvit.model.gcvit, tfgcvit.export\n"
        "assert machinery() == before, machinery()\n"
        "assert 'keras_hub' not in sys.modules, 'import tfgcvit imported keras-hub'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# The one private name of another library the package uses: keras-hub registers the presets of
# the models it ships with `register_presets` and has no public name for it (keras_hub 0.32:
# neither `keras_hub.utils` nor `keras_hub.models` exports it).
PRIVATE_IMPORTS_ALLOWED = {("keras_hub.src.utils.preset_utils", "register_presets")}
# Underscored names of the standard library that are its public API.
STDLIB_UNDERSCORED = {("os", "_exit")}
PRIVATE_MODULES = ("keras.src", "keras_hub.src")
# onnxruntime's `SymbolicShapeInference` keeps its state in names without a leading underscore.
ONNXRUNTIME_STATE = {"out_mp_", "run_"}


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _names_defined_in_package():
    """Underscored names the package defines itself: functions, classes, variables, attributes."""
    names = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if _is_private(name)}


def _external_import_names(tree):
    """Names a module binds to other libraries' modules or objects (`import keras`, `from x import y`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                         if not alias.name.startswith("tfgcvit"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not node.module.startswith("tfgcvit"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _private_uses(path, own_names):
    """`obj._name` reads (also through getattr/hasattr) of names the package does not define, or of
    anything on another library's module, and imports of keras.src / keras_hub.src."""
    tree = ast.parse(path.read_text(), filename=str(path))
    external = _external_import_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{_module_name(path) or 'tfgcvit'}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr in ONNXRUNTIME_STATE:
            found.append(f"{where} reads {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = _root_name(node.value)
            if root in ("self", "cls") and isinstance(node.value, ast.Name):
                continue
            if isinstance(node.value, ast.Call) and _root_name(node.value) == "super":
                continue
            if (root, node.attr) in STDLIB_UNDERSCORED:
                continue
            if node.attr not in own_names or root in external:
                found.append(f"{where} reads {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _is_private(node.args[1].value) and node.args[1].value not in own_names):
            found.append(f"{where} reads {ast.unparse(node)}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = ([(alias.name, None) for alias in node.names] if isinstance(node, ast.Import)
                       else [(node.module or "", alias.name) for alias in node.names])
            for module, name in modules:
                if module.startswith(PRIVATE_MODULES) and (module, name) not in PRIVATE_IMPORTS_ALLOWED:
                    found.append(f"{where} imports {module}" + (f".{name}" if name else ""))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(tuple(m + "." for m in PRIVATE_MODULES))):
            found.append(f"{where} names the module {node.value!r}")  # importlib, sys.modules
    return found


def test_the_package_reads_no_private_name_of_another_library():
    """No `keras_object._name`, onnxruntime internals, keras.src imports or stack walking (`sys._getframe`).

    The one exception, named above: keras-hub's `register_presets`."""
    own_names = _names_defined_in_package()
    found = [use for path in _modules().values() for use in _private_uses(path, own_names)]
    assert found == []
    hub = ast.parse((PACKAGE / "hub.py").read_text())
    used = {(node.module, alias.name) for node in ast.walk(hub) if isinstance(node, ast.ImportFrom)
            for alias in node.names}
    assert PRIVATE_IMPORTS_ALLOWED <= used, "the named exception is no longer used: remove it from the test"
