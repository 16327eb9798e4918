"""The package's layers point one way, and only the Ray layer imports Ray.

Every module of the package is parsed (imports inside functions count too) and each import of
another ``hericap`` module is checked against :data:`LAYERS`; a new module is covered without
editing a list. A subprocess then imports every module below the Ray layer and checks that Ray
was never loaded, not even through a third-party package. No library function is longer than
:data:`MAX_FUNCTION_LINES`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hericap

PACKAGE_DIR = Path(hericap.__file__).parent

# Lowest first. A module may import modules of a lower layer, and of its own group; never one of
# a higher layer or of another group on the same layer (training and serve are siblings).
LAYERS: list[tuple[str, ...]] = [
    ("hericap", "hericap.log", "hericap.config"),
    ("hericap.data",),
    ("hericap.models",),
    ("hericap.checkpoint",),
    ("hericap.evaluation",),
    ("hericap.runtime",),
    ("hericap.training",),
    ("hericap.serve",),
    ("hericap.tune",),
    ("hericap.cli", "hericap.__main__"),
]
# Layers from here up run things on Ray and may import it.
RAY_LAYER = LAYERS.index(("hericap.runtime",))
# training and serve are siblings: neither imports the other
SIBLINGS = {frozenset({"hericap.training", "hericap.serve"})}


def _group(module: str) -> tuple[int, str]:
    """(layer index, group prefix) of a dotted module name: the longest matching prefix."""
    best: tuple[int, str] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (rank, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS")
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement, anywhere in the file."""
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    return found


def test_every_module_is_in_a_layer():
    for module in _modules():
        _group(module)


def test_imports_point_down_and_ray_stays_in_the_ray_layer():
    upward, ray_outside = [], []
    for module, path in _modules().items():
        rank, group = _group(module)
        for line, target in _imports(path, module):
            where = f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {target}"
            if target == "ray" or target.startswith("ray."):
                if rank < RAY_LAYER:
                    ray_outside.append(where)
                continue
            if not target.startswith("hericap"):
                continue
            target_rank, target_group = _group(target)
            if target_rank > rank or frozenset({group, target_group}) in SIBLINGS:
                upward.append(where)
    assert not upward, "imports that run up (or sideways) the layers:\n" + "\n".join(upward)
    assert not ray_outside, "Ray imported below the Ray layer:\n" + "\n".join(ray_outside)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a file importing a higher layer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hericap.training.driver import train\n")
    (target,) = [t for _, t in _imports(bad, "hericap.models.bad")]
    assert _group(target)[0] > _group("hericap.models.bad")[0]


@pytest.mark.slow
def test_everything_below_the_ray_layer_imports_without_ray():
    below = [m for m in _modules() if _group(m)[0] < RAY_LAYER]
    # the Ray-free modules of the Ray layer that `hericap caption` runs on
    below += ["hericap.serve.images", "hericap.serve.service"]
    code = (
        "import sys\n"
        f"for m in {below!r}:\n"
        "    __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"Ray imported below the Ray layer: {proc.stdout} {proc.stderr}"
    assert len(below) > 30, below  # the walk found the package


def test_ray_layers_do_import_ray():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, hericap.runtime.datasets; sys.exit(0 if 'ray' in sys.modules else 1)",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# the house rule for library functions: one job each, readable on one screen
MAX_FUNCTION_LINES = 80


def _long_functions(source: str, where: str) -> list[str]:
    """``where:name (N lines)`` for each function (methods and nested ones included) longer
    than :data:`MAX_FUNCTION_LINES` (from ``def`` to the last line, docstring included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.name} ({lines} lines)")
    return found


def test_no_library_function_is_longer_than_the_house_limit():
    long = [
        f for module, path in _modules().items() for f in _long_functions(path.read_text(), module)
    ]
    assert not long, long


def test_the_length_check_catches_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions(f"def f():\n{body}\n", "m") == [f"m:f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert _long_functions("def g():\n    return 1\n", "m") == []
