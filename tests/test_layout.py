"""The architecture the folders show: the library never imports the lab, and no module reaches into
another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement in ``path`` (relative imports resolved to absolute names)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [name for alias in node.names for name in (alias.name, alias.asname) if name]))
    return found


@pytest.mark.parametrize("path", python_files("diffusers_guda"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_the_lab(path):
    assert not [m for m, _ in imports(path) if m == "guda_lab" or m.startswith("guda_lab.")]


@pytest.mark.parametrize(
    "path", python_files("diffusers_guda", "guda_lab", "tests", "benchmarks", "examples"), ids=lambda p: str(p.relative_to(REPO))
)
def test_no_private_names_cross_a_module_boundary(path):
    private = [(m, n) for m, names in imports(path) for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, f"{path.relative_to(REPO)} imports private names {private}"


def test_library_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in python_files("diffusers_guda")}
    assert not {name: n for name, n in sizes.items() if n > 400}


def test_every_package_is_installed():
    """setup.cfg lists the packages by name: a new subpackage must be added there, or a wheel lacks it."""
    from setuptools.config.setupcfg import read_configuration

    listed = set(read_configuration(REPO / "setup.cfg")["options"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in python_files("diffusers_guda", "guda_lab") if p.name == "__init__.py"}
    assert found | {"diffusers_guda.recipe_data"} == listed
