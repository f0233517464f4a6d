"""The rules of docs/architecture.md: small files, slim Lightning classes, no import cycle, Lightning only on top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ko_lightning"
MAX_FILE_LINES = 600
MAX_CLASS_LINES = {("module.py", "FlowMatching"): 250, ("callbacks/ko_schedule.py", "KOScheduleCallback"): 250}
LIGHTNING_FREE = (
    "ko_lightning.paths",
    "ko_lightning.kinetic",
    "ko_lightning.ode",
    "ko_lightning.sampling",
    "ko_lightning.likelihood",
    "ko_lightning.parametrizations",
    "ko_lightning.metrics",
    "ko_lightning.conditioning",
    "ko_lightning.guidance",
    "ko_lightning.inference",
    "ko_lightning.objective",
    "ko_lightning.time_samplers",
    "ko_lightning.time_grids",
    "ko_lightning.model_flow",
)


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path) -> set[str]:
    """ko_lightning modules imported at module level or inside functions (TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ko_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ko_lightning"))
    return found


def test_no_file_in_the_package_is_over_600_lines() -> None:
    long = {
        str(f.relative_to(ROOT)): n
        for f in PACKAGE.rglob("*.py")
        if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert not long, long


def test_the_lightning_classes_stay_slim() -> None:
    for (relative, name), limit in MAX_CLASS_LINES.items():
        tree = ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        start = min([cls.lineno, *(d.lineno for d in cls.decorator_list)])
        assert cls.end_lineno is not None and cls.end_lineno - start + 1 <= limit, (name, cls.end_lineno - start + 1)


def test_no_import_cycle_between_package_modules() -> None:
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # "from ko_lightning.paths.base import X" -> ko_lightning.paths.base
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {r for i in _imports(f) if (r := resolve(i)) and r != m} for m, f in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_lower_layers_load_no_lightning() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIGHTNING_FREE)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
