"""The package's shape: no import cycle among ``insid3_core``'s modules (imports anywhere in a module,
deferred ones included, ``TYPE_CHECKING`` ones not), the engine imports neither integration, and the code cites docs that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "insid3_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The ``insid3_core`` modules ``path`` imports, type-checking-only imports left out."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            found.update(candidate for candidate in candidates if candidate in known)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(CORE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) for path in paths}


def test_no_import_cycle_in_the_engine():
    edges = graph()
    cycles = []

    def visit(name, trail):
        for other in sorted(edges.get(name, ())):
            if other in trail:
                cycles.append(trail[trail.index(other):] + [other])
            elif len(trail) < 12:
                visit(other, trail + [other])

    for name in sorted(edges):
        visit(name, [name])
    assert not cycles, f"import cycles: {sorted({' -> '.join(cycle) for cycle in cycles})[:5]}"


def test_the_engine_imports_neither_integration():
    for path in CORE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (fiftyone_plugin|labelstudio_backend)", text, re.M), path


def test_cited_documents_exist():
    for path in [*CORE.rglob("*.py"), *(ROOT / "labelstudio_backend").rglob("*.py"),
                 *(ROOT / "fiftyone_plugin").rglob("*.py"), *(ROOT / "tests").rglob("test_*.py")]:
        for cited in re.findall(r"\b(?:docs/[a-z_]+|[A-Z][A-Z_]+)\.md\b", path.read_text()):
            candidates = [ROOT / cited, ROOT / "docs" / cited, path.parent / cited]
            assert any(candidate.is_file() for candidate in candidates), f"{path} cites {cited}"
