"""The package's layout holds: no import circles, and no arrow from the core back up to a subsystem."""

from __future__ import annotations

import ast
from pathlib import Path

import watchfolder

PACKAGE = Path(watchfolder.__file__).parent
#: Modules that the subsystems build on; they never import a subsystem or the CLI.
CORE = ("watchfolder.store", "watchfolder.job", "watchfolder.config", "watchfolder.errors", "watchfolder.defaults")
SUBSYSTEMS = ("watchfolder.web", "watchfolder.watch", "watchfolder.mail", "watchfolder.cli", "watchfolder.service")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The watchfolder modules ``path`` imports (module level only, or anywhere)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("watchfolder"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("watchfolder"))
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "omero_child" not in p.parts}


def test_core_modules_never_import_a_subsystem():
    for name, path in package_modules().items():
        if not name.startswith(CORE):
            continue
        bad = sorted(t for t in imports(path, top_level_only=False) if t.startswith(SUBSYSTEMS))
        assert not bad, f"{name} imports {bad}: the core must not depend on a subsystem"


def test_no_import_circles():
    modules = package_modules()
    graph = {
        name: {t for t in imports(path, top_level_only=False) if t in modules and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how it exports them, not a circle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_omero_child_imports_nothing_of_the_service():
    for path in (PACKAGE / "omero_child").rglob("*.py"):
        assert not imports(path, top_level_only=False), f"{path.name} must run alone on Python 3.10"


def test_the_http_contract_has_no_duplicate_keys():
    # YAML keeps the last of two equal keys silently: a second schema named like a first one
    # replaced it for every $ref (two `Target` schemas did).
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        assert not duplicates, f"api/openapi.yaml line {node.start_mark.line + 1}: duplicate keys {duplicates}"
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    yaml.load((PACKAGE.parent / "api" / "openapi.yaml").read_text(encoding="utf-8"), Loader=Strict)
