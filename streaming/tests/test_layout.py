"""The package's shape: no import cycle among the library's modules, and the
library does not depend on the demo or on its own tests."""

import ast
import unittest
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def library_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "tests" in parts or "migrations" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules that ``name`` imports when it runs (library modules resolved to the
    deepest one known), lazy imports inside functions included, ``if
    TYPE_CHECKING:`` blocks excluded."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(module: str | None, level: int) -> str | None:
        if level == 0:
            return module
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.module, node.level)
            if target:
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


class ImportGraphTests(unittest.TestCase):
    def setUp(self):
        self.modules = library_modules()
        known = set(self.modules)
        self.imports = {name: runtime_imports(name, path, known) for name, path in self.modules.items()}
        self.graph = {name: {m for m in found if m in known} for name, found in self.imports.items()}

    def test_the_library_has_no_import_cycle(self):
        self.assertIsNone(find_cycle(self.graph), "import cycle among the library's modules")

    def test_the_cycle_finder_finds_a_cycle(self):
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])

    def test_the_graph_sees_lazy_and_relative_imports(self):
        # signals imports tasks.wake relatively; wake imports transports (a package).
        self.assertIn("streaming.tasks.wake", self.graph["streaming.signals"])
        self.assertIn("streaming.transports", self.graph["streaming.tasks.wake"])

    def test_the_library_never_imports_the_demo_or_its_tests(self):
        for name, found in self.imports.items():
            for module in found:
                top = module.split(".")[0]
                self.assertNotIn(top, ("demo", "config"), f"{name} imports {module}")
                self.assertFalse(module.startswith("streaming.tests"), f"{name} imports {module}")

    def test_the_dashboard_reaches_the_server_over_http_only(self):
        # Its pages read streams as any client does; its views never touch the
        # node, the hub or the server.
        dashboard = [name for name in self.graph if name.startswith("streaming.dashboard")]
        self.assertIn("streaming.dashboard.views", dashboard)
        for name in [*dashboard, "streaming.urls"]:
            for module in self.graph[name]:
                self.assertFalse(
                    module.startswith(
                        ("streaming.web", "streaming.server", "streaming.fanout", "streaming.node")
                    ),
                    f"{name} imports {module}",
                )

    def test_the_client_needs_neither_django_nor_the_rest_of_the_library(self):
        # streaming.client runs in any Python program with httpx and httpx-sse.
        client_modules = [name for name in self.modules if name.startswith("streaming.client")]
        self.assertIn("streaming.client.protocol", client_modules)
        for name in client_modules:
            for module in self.imports[name]:
                self.assertFalse(module.split(".")[0] == "django", f"{name} imports {module}")
                if module.startswith("streaming"):
                    self.assertTrue(module.startswith("streaming.client"), f"{name} imports {module}")

    def test_only_the_compat_module_imports_the_tasks_framework(self):
        # Django 6's django.tasks or the django-tasks backport: the choice is made in one place.
        for name, found in self.imports.items():
            framework = {m for m in found if m.startswith(("django.tasks", "django_tasks"))}
            if name != "streaming.taskbackend.compat":
                self.assertEqual(framework, set(), f"{name} imports {framework}")
        self.assertIn("django.tasks", self.imports["streaming.taskbackend.compat"])
