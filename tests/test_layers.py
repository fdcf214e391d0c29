"""Imports run one way: data <- models <- pretrained <- evaluate <- training <- shapes <- index / serve / cli.

The test reads every module of the package (its source, not by importing it), finds each
in-package import, module-level or inside a function, and fails on an edge that runs from a
lower layer to a higher one. The Shapes world sits above the general layers it uses, so the
general library never imports it (registry.py names its classes as strings, resolved lazily).
A function-level import is for an optional or heavy dependency only, said in a comment on its line
or the line above ("optional", "heavy"): the test also fails on an in-package import inside a
function without one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "multimodal_models"

# lower number = lower layer; a module may import its own layer and those below it
LAYERS = {
    "errors": 0, "io": 0, "registry": 0, "version": 0, "devices": 0,
    "data": 1,
    "models": 2,
    "pretrained": 3, "loading": 3, "export": 3,
    "evaluate": 4,
    "training": 5,
    "shapes": 6,
    "index": 7, "serve": 7, "experiments": 7, "demo": 7, "cli": 8, "__init__": 9,
}


def layer_of(module: str) -> str:
    """'multimodal_models.models.vlm' -> 'models'; 'multimodal_models' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported in-package module, line, inside a function) of one file."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("multimodal_models"):
                    # `from . import x` names a module, or a name the package's __init__ defines
                    targets = [target]
                    if not child.module:
                        folder = PACKAGE.parent.joinpath(*target.split("."))
                        targets = [f"{target}.{a.name}" if (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()
                                   else target for a in child.names]
                    found.extend((t, child.lineno, in_function) for t in targets)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names
                             if a.name.startswith("multimodal_models"))
            visit(child, inner)

    visit(tree, False)
    return found


def test_imports_run_one_way_and_none_hides_in_a_function():
    upward, hidden = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        lines = path.read_text().splitlines()
        for target, line, in_function in imports(path):
            here, there = layer_of(source), layer_of(target)
            assert here in LAYERS and there in LAYERS, f"{source} -> {target}: add its layer to LAYERS"
            if LAYERS[there] > LAYERS[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {target} ({there})")
            said = " ".join(lines[max(0, line - 2):line]).lower()
            if in_function and "optional" not in said and "heavy" not in said:
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target} inside a function")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)
    assert not hidden, ("in-package imports inside functions (only for an optional or heavy dependency, said in a "
                        "comment):\n" + "\n".join(hidden))


def test_the_general_layers_know_nothing_of_the_shapes_world():
    for layer in ("models", "pretrained", "training", "evaluate", "data"):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for target, line, _ in imports(path):
                assert layer_of(target) != "shapes", f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk itself: a relative import from models/ into training/ is found and placed."""
    fake = PACKAGE / "models" / "vlm.py"
    found = {target for target, _, _ in imports(fake)}
    assert "multimodal_models.models.text" in found  # `from .text import ...`
    assert layer_of("multimodal_models.training.loop") == "training" and LAYERS["training"] > LAYERS["models"]
