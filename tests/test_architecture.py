"""Two deployables, one rule: the function app (``function_app.py``, ``functions/``, ``shared/``) never
imports the container job (``job/``), the tools or the benchmarks, and nothing imports in a loop."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pathspec

from tests.import_graph import cycles, import_graph, project_modules, upward_imports

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_loops_and_no_upward_imports() -> None:
    graph = import_graph(ROOT)
    assert {"shared.index", "job.index_build", "functions.http_api", "tools.cli"} <= set(graph)
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def test_the_rules_catch_a_loop_and_an_upward_import(tmp_path: Path) -> None:
    """The checker itself, on a tree that breaks both rules."""
    for name, text in {
        "shared/__init__.py": "",
        "shared/a.py": "from shared import b\n",
        "shared/b.py": "def f():\n    from shared.a import x\n",  # a loop, even through a lazy import
        "shared/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from job.w import W\n",
        "job/__init__.py": "",
        "job/w.py": "import shared.c\n",
    }.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("shared", "job"))
    assert cycles(graph) == [["job.w", "shared.c"], ["shared.a", "shared.b"]]
    assert upward_imports(graph) == [("shared.c", "job.w")]


def function_app_files() -> list[str]:
    """The tracked files the function app's package holds: what `.funcignore` leaves."""
    spec = pathspec.PathSpec.from_lines("gitignore", (ROOT / ".funcignore").read_text().splitlines())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(f for f in tracked.splitlines() if not spec.match_file(f))


def test_function_app_package_holds_no_job_code_and_is_self_contained() -> None:
    files = function_app_files()
    assert "function_app.py" in files and "host.json" in files and "requirements.txt" in files
    tops = {f.split("/")[0] for f in files}
    assert not tops & {"job", "tools", "bench", "tests", "infra", "docs"}, tops
    packaged = {m for m, p in project_modules(ROOT).items() if str(p.relative_to(ROOT)) in files}
    assert {"function_app", "functions.http_api", "shared.search"} <= packaged
    graph = import_graph(ROOT)
    missing = {(m, t) for m in packaged for t in graph[m] if t not in packaged}
    assert not missing, f"the function app imports modules it does not ship: {sorted(missing)}"


def test_job_image_copies_shared_and_job_only() -> None:
    """The final stage of the job images (after the last FROM) adds the library and the job, no tools; the
    runtime stages before it copy only their requirements."""
    dockerfile = (ROOT / "job" / "Dockerfile").read_text()
    stages = dockerfile.split("\nFROM ")
    copied = [line.split()[1] for line in stages[-1].splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert set(copied) == {"shared", "job"}, copied
    for stage in stages[1:-1]:
        if stage.splitlines()[0].split()[-1].startswith("runtime-"):
            sources = [w for line in stage.splitlines() if line.startswith("COPY ") for w in line.split()[1:-1]]
            assert sources and all(w.startswith("job/requirements") for w in sources), sources


WEB = ("fastapi", "starlette", "uvicorn", "multipart", "azure.functions")  # not in the job image


def test_job_side_never_imports_the_web_stack() -> None:
    """The job image has no FastAPI or Functions host: nothing the job reaches may import them."""
    graph = import_graph(ROOT)
    reach, todo = set(), [m for m in graph if m.split(".")[0] == "job"]
    while todo:
        module = todo.pop()
        if module not in reach:
            reach.add(module)
            todo.extend(graph[module])
    modules = project_modules(ROOT)
    for module in sorted(reach):
        tree = ast.parse(modules[module].read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]
        assert not [n for n in names if n.startswith(WEB)], (module, [n for n in names if n.startswith(WEB)])


def test_the_http_layer_stays_thin() -> None:
    """functions/ parses, calls one core function and answers: small in total, every route short."""
    files = sorted((ROOT / "functions").rglob("*.py"))
    total = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    # 460 before the near-duplicates routes (functions/api/duplicates.py: three routes, no logic)
    assert total <= 520, f"functions/ is {total} lines: move logic into shared/"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.decorator_list:
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 20, f"{path.name}:{node.name} is {length} lines"


def test_no_symbolic_links_are_tracked() -> None:
    """A link to a local build folder (a venv, Azurite) breaks every other clone: none may be committed."""
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in staged.splitlines() if line.startswith("120000 ")]
    assert links == [], links
