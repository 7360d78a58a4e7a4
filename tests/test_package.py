"""What the installed library is made of: its imports, its declared dependencies, its version.

Read from the source with ``ast`` (every import, also those inside functions), so a lazy import counts as much as a
top-level one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import peft_gnnmoe

ROOT = Path(__file__).resolve().parents[1]
# setup.py's requirements are read by the one reader CI's dependency checks use
_spec = importlib.util.spec_from_file_location("check_deps", ROOT / "scripts" / "check_deps.py")
check_deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_deps)
PACKAGE = ROOT / "peft_gnnmoe"
# imported by peft_gnnmoe only inside a function, for an optional feature that says how to install it when missing
OPTIONAL_IMPORTS = {
    "skimage": "scikit-image",  # `peft-gnnmoe analyze --image skimage:NAME`
    "trl": "trl",  # peft_gnnmoe.trl, not imported by `import peft_gnnmoe`
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement in ``path``, relative imports made absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, [alias.name for alias in node.names]))
    return found


def _internal_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Edges ``module -> module`` between the modules of ``package`` (default peft_gnnmoe)."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_library():
    assert _cycles(_internal_graph()) == []


def test_no_import_cycle_in_the_recipes():
    assert _cycles(_internal_graph(ROOT / "recipes")) == []


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the library modules that import it."""
    users: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for module, _ in _imports(path):
            top = module.split(".")[0]
            if top != "peft_gnnmoe" and top not in sys.stdlib_module_names and top != "__future__":
                users.setdefault(top, set()).add(_module_name(path))
    return users


def _project_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_the_library_does_not_import_the_recipes():
    assert "recipes" not in _third_party_imports()


def test_install_requires_is_exactly_what_the_library_imports():
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for top in set(_third_party_imports()) - set(OPTIONAL_IMPORTS):
        assert top in distributions, f"{top} is imported by peft_gnnmoe but not installed"
        imported |= {canonicalize_name(d) for d in distributions[top]}
    assert _project_names(check_deps.setup_literal("INSTALL_REQUIRES")) == imported


def test_optional_imports_are_in_an_extra():
    extras = check_deps.setup_literal("EXTRAS_REQUIRE")
    assert set(OPTIONAL_IMPORTS.values()) <= _project_names([r for reqs in extras.values() for r in reqs])


def test_the_changelog_has_an_entry_for_this_version():
    assert f"\n## {peft_gnnmoe.__version__}" in (ROOT / "CHANGELOG.md").read_text()
