"""The house rules of the package's layout, checked on its source: a module imports only from its own
floor or the floors below (kernels < models < loaders < runtime < serve < cli), nothing imports the
cli or the benchmarks, and the pure side of the runtime (runtime/cache, and replay over it) runs
without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

PACKAGE = ROOT / "moeinf"
# floor of each top-level part of the package; errors and atomic_write import nothing of moeinf
FLOORS = {"errors": 0, "atomic_write": 0, "kernels": 1, "models": 2, "loaders": 3, "runtime": 4, "serve": 5, "cli": 6}
API = 7  # moeinf/__init__.py: the public names, from any floor
# The pure side of the runtime: moeinf modules it may import (policy is pure; mechanism touches memory)
PURE = ("moeinf.runtime.cache", "moeinf.errors", "moeinf.atomic_write")
TORCH_FREE = ("moeinf.runtime.cache", "moeinf.runtime.replay")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    return API if len(parts) == 1 else FLOORS.get(parts[1], API)  # moeinf.LLM: a public name


def imported_modules(source: str, module: str, is_package: bool = False) -> list[str]:
    """The modules `source` (of `module`, a package's __init__ if is_package) imports, relative
    imports made absolute, leaving out what is imported only for annotations (under `if
    TYPE_CHECKING:`)."""
    tree = ast.parse(source)
    skipped = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and ast.unparse(guard.test).endswith("TYPE_CHECKING")
        for node in ast.walk(guard)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package, node.level - 1 up
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module)
                if node.module.split(".")[0] == "moeinf":  # names may be modules: from moeinf.kernels import fp8
                    found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def package_imports() -> dict[str, list[str]]:
    """module -> the moeinf (and bench) modules it imports, for every module of the package."""
    result = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        names = imported_modules(path.read_text(), module, path.name == "__init__.py")
        result[module] = [n for n in names if n == "moeinf" or n.startswith(("moeinf.", "bench"))]
    return result


def upward_imports(imports: dict[str, list[str]]) -> list[str]:
    """'importer -> imported' for every import that reaches above the importer's floor."""
    bad = []
    for module, names in imports.items():
        for name in names:
            if name.startswith("bench") or (name != "moeinf" and floor(name) > floor(module)):
                bad.append(f"{module} -> {name}")
            elif name == "moeinf" and module != "moeinf":  # the public API imports everything
                bad.append(f"{module} -> {name}")
    return bad


def test_the_walker_sees_the_imports_and_flags_an_upward_one():
    imports = package_imports()
    assert "moeinf.runtime.executor" in imports["moeinf.runtime.engine"]
    assert "moeinf.kernels.mxfp4" in imports["moeinf.models.spec"]
    assert sum(map(len, imports.values())) > 150
    planted = {"moeinf.models.spec": ["moeinf.loaders.checkpoint"], "moeinf.runtime.engine": ["moeinf.cli"]}
    assert upward_imports(planted) == [
        "moeinf.models.spec -> moeinf.loaders.checkpoint",
        "moeinf.runtime.engine -> moeinf.cli",
    ]
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moeinf.cli import main\nimport moeinf.errors\n"
    )
    assert imported_modules(source, "moeinf.kernels.x") == ["typing", "moeinf.errors"]
    assert upward_imports({"moeinf.loaders.x": imported_modules("from moeinf import LLM", "moeinf.loaders.x")}) == [
        "moeinf.loaders.x -> moeinf",
        "moeinf.loaders.x -> moeinf.LLM",
    ]
    assert imported_modules("from ..loaders import checkpoint", "moeinf.models.spec") == ["moeinf.loaders"]


def test_every_import_stays_on_its_floor_or_below():
    assert upward_imports(package_imports()) == []


def test_the_pure_side_imports_only_the_pure_side():
    bad = [
        f"{module} -> {name}"
        for module, names in package_imports().items()
        if module.startswith("moeinf.runtime.cache")
        for name in names
        if not name.startswith(PURE)
    ]
    assert bad == []


@pytest.mark.parametrize("package", TORCH_FREE)
def test_the_pure_side_runs_without_torch(package):
    modules = sorted(module_name(p) for p in (ROOT / package.replace(".", "/")).rglob("*.py"))
    assert len(modules) >= 5
    # torch and what would pull it in are made unimportable: an import of them raises ImportError
    script = (
        "import sys\n"
        "for name in ('torch', 'triton', 'cupy', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('moeinf')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "moeinf.runtime.engine" not in run.stdout and package in run.stdout
