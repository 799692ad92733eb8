"""The package layout stays true: which subpackage may import which, and where trio,
pyfuse3 and httpx may appear (docs/design.md, "Packages"). Parses every module with `ast`,
imports inside functions included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "backupfs"
CORE = "core"  # errors, options, ranges, stats: the modules at the top of the package
# What each layer may import, besides itself and the core.
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    "linux": set(),
    "store": {"linux"},
    "remote": {"linux", "store"},
    "readpath": {"linux", "store"},
    "attach": {"linux"},
    "plan": {"linux", "attach"},
    "mount": {"linux", "store", "remote", "readpath", "plan"},
    "restore": {"linux", "attach", "plan"},
    "snapshots": {"linux", "store", "remote", "readpath", "plan", "mount"},
    "cli": {
        "linux", "store", "remote", "readpath", "attach", "plan", "mount", "restore", "snapshots",
    },
}
# Third-party packages that only some layers may use.
RESTRICTED = {
    "trio": {"remote", "readpath", "mount", "snapshots", "cli"},
    "pyfuse3": {"mount"},
    "httpx": {"remote"},
    "httpcore": {"remote"},
    "prometheus_client": {"mount"},
}
MAX_LINES = 450


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return "cli" if rel.name == "__main__.py" else CORE
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Dotted names of everything `path` imports (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _target_layer(name: str) -> str | None:
    """The layer a `backupfs...` import lands in, or None for backupfs itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    top = parts[1]
    if top in ALLOWED:
        return top
    if (PACKAGE / f"{top}.py").exists() or top == "__version__":
        return CORE
    raise AssertionError(f"import of unknown backupfs module {name}")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_layer_is_a_package_with_a_docstring() -> None:
    for layer in set(ALLOWED) - {CORE}:
        init = PACKAGE / layer / "__init__.py"
        assert init.exists(), f"{layer}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 20, f"{init}: say what it holds and may import"
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(ALLOWED), f"a package the layering test does not know: {packages}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = _layer(path)
    may = ALLOWED[layer] | {layer, CORE}
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "backupfs":
            target = _target_layer(name)
            assert target is None or target in may, f"{layer} must not import {name}"
        elif top in RESTRICTED:
            assert layer in RESTRICTED[top], f"{layer} must not import {top} ({name})"


REPO = PACKAGE.parent
ALL_MODULES = sorted(
    p
    for top in ("backupfs", "tests", "bench")
    for p in (REPO / top).rglob("*.py")
    if "out" not in p.relative_to(REPO).parts  # bench/out: data and mounts of benchmarks
)


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines, split it"


def test_the_test_sees_a_violation(tmp_path: Path) -> None:
    """The checks above would catch a bad import: the parser finds nested imports too."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from backupfs.mount import daemon\n    import httpx\n")
    assert {"backupfs.mount.daemon", "backupfs.mount", "httpx"} <= _imports(bad)
    assert _target_layer("backupfs.mount.daemon") not in ALLOWED["restore"]
