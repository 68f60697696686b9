"""The layout rules of docs/architecture.md, checked on the source with the stdlib `ast` (nothing is imported):

- no import cycle among the modules of attribute_ray, deployments, jobs and bench (function-level imports count);
- attribute_ray never imports deployments, jobs or ray at module level;
- every .py file in deployments/ and jobs/ stays under 300 lines;
- every citation of method.md, formats.md or ray-notes is of a docs/ file that exists, at a section it has;
- no module defining a `@serve.ingress` class postpones annotations (docs/ray-notes.md #1).

The checkers are tested on hand-made graphs and packages first, so that passing on the repository means something.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attribute_ray", "deployments", "jobs", "bench")
SHELLS = ("deployments", "jobs")
MAX_SHELL_LINES = 300
FORBIDDEN_IN_LIBRARY = ("deployments", "jobs", "ray")

Graph = Mapping[str, Iterable[str]]


# ----- the checkers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported name as written (`name` is absolute: relative imports resolved), where, and whether it runs
    when the module is imported (not inside a function, not under ``if TYPE_CHECKING:``)."""

    name: str
    line: int
    module_level: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file of every .py file under the `packages` folders of `root`."""
    return {module_name(p, root): p for pkg in packages if (root / pkg).is_dir() for p in sorted((root / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import in `source`, the text of `module`. For ``from X import a`` both X and X.a are listed (X.a may
    be a submodule); relative imports are resolved against the module's package."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(base, node.lineno, module_level))
            found.extend(Import(f"{base}.{a.name}", node.lineno, module_level) for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(ast.parse(source), True)
    return found


def resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of dotted `name` that is one of `modules`, or None (a third-party or stdlib import)."""
    known = set(modules)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: Mapping[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}. A module's imports of itself or of its own parent packages
    are left out: Python runs a package's __init__ before its submodules whatever they import."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m, path in modules.items():
        for imp in imports(path.read_text(encoding="utf-8"), m, path.name == "__init__.py"):
            target = resolve(imp.name, modules)
            if target and target != m and not m.startswith(target + "."):
                graph[m].setdefault(target, imp.line)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """The import cycles of `graph` (node -> successors): its strongly connected components with more than one
    node, each sorted, in sorted order. Iterative Tarjan, so deep graphs cannot overflow the stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {w for vs in graph.values() for w in vs})
    succ = {v: sorted(graph.get(v, ())) for v in nodes}
    for start in nodes:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            for j in range(i, len(succ[v])):
                w = succ[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
    return sorted(components)


def shortest_cycle(graph: Graph, start: str) -> list[str]:
    """The shortest path start -> ... -> start (breadth-first), or [] if `start` is on no cycle."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return []


def module_level_imports_of(modules: Mapping[str, Path], package: str, forbidden: Iterable[str]) -> list[tuple[Path, int, str]]:
    """(file, line, name) of every module-level import in `package` of a name whose top level is in `forbidden`."""
    bad = set()
    for m, path in modules.items():
        if m.split(".")[0] != package:
            continue
        for imp in imports(path.read_text(encoding="utf-8"), m, path.name == "__init__.py"):
            if imp.module_level and imp.name.split(".")[0] in forbidden:
                bad.add((path, imp.line, imp.name))
    return sorted(bad)


_SECTION = r"\d+(?:\.\d+)*|[a-z]\b"  # method.md §9 or §9.1, formats.md §e
CITATION = re.compile(rf"(?P<prefix>[\w./-]*?)(?P<doc>method\.md|formats\.md|ray-notes(?:\.md)?)"
                      rf"(?: *(?:pitfall *)?(?:§ *(?P<a>{_SECTION})(?: *[–-] *§? *(?P<b>{_SECTION}))?"
                      rf"|#(?P<c>\d+)(?: *[–-] *#?(?P<d>\d+))?))?")


def _has_section(doc: str, text: str, ref: str) -> bool:
    if doc == "formats.md":
        return f"## ({ref.lower()})" in text
    if doc == "ray-notes.md":
        return re.search(rf"^\| {int(ref)} \|", text, re.M) is not None
    level = "###" if "." in ref else "##"
    return re.search(rf"^{level} {re.escape(ref)}\.? ", text, re.M) is not None


def bad_citations(text: str, docs: Path) -> list[str]:
    """Problems with the citations in `text`: a document cited by any path other than docs/NAME, a docs/ file that
    does not exist, or a section (method.md §N or §N.M, formats.md §x, ray-notes.md #N; ranges: both ends) it lacks."""
    problems = []
    for m in CITATION.finditer(text):
        where = f"line {text.count(chr(10), 0, m.start()) + 1}"
        doc = m["doc"] if m["doc"].endswith(".md") else "ray-notes.md"
        if m["prefix"] != "docs/":
            problems.append(f"{where}: cites {m['prefix']}{m['doc']}: cite docs/{doc}")
            continue
        path = docs / doc
        if not path.is_file():
            problems.append(f"{where}: cites docs/{doc}, which does not exist")
            continue
        body = path.read_text(encoding="utf-8")
        for ref in filter(None, (m["a"], m["b"], m["c"], m["d"])):
            if not _has_section(doc, body, ref):
                problems.append(f"{where}: cites docs/{doc} {ref}, which has no such section")
    return problems


def ingress_modules_with_postponed_annotations(paths: Iterable[Path]) -> list[Path]:
    """The files that define a ``@serve.ingress(...)`` class and also say ``from __future__ import annotations``."""
    bad = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                     for n in tree.body)
        ingress = any(isinstance(d, ast.Call) and isinstance(d.func, (ast.Attribute, ast.Name))
                      and getattr(d.func, "attr", getattr(d.func, "id", None)) == "ingress"
                      for n in ast.walk(tree) if isinstance(n, ast.ClassDef) for d in n.decorator_list)
        if future and ingress:
            bad.append(path)
    return bad


# ----- the checkers on hand-made inputs -----------------------------------------------------------------------


def test_find_cycles_on_hand_made_graphs() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": ["d", "f"], "f": [], "g": ["a"]}
    assert find_cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []  # a diamond is no cycle
    assert find_cycles({"x": ["y"]}) == []  # successors need not be keys
    assert shortest_cycle(graph, "a") == ["a", "b", "c", "a"]
    assert shortest_cycle(graph, "e") == ["e", "d", "e"]
    assert shortest_cycle(graph, "g") == []
    chain = {str(i): [str(i + 1)] for i in range(5000)}  # deeper than the recursion limit
    assert find_cycles(chain) == []
    chain["5000"] = ["0"]
    assert find_cycles(chain) == [sorted(str(i) for i in range(5001))]


def test_imports_resolve_relative_names_and_tell_module_level_apart(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text(
        "import ray\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jobs.x\n"
        "def f():\n    from pkg import b\n    import ray.serve\n    return b\n"
        "class C:\n    from .sub import c\n")
    (pkg / "b.py").write_text("from . import a\ntry:\n    import numpy\nexcept ImportError:\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..b import *\nfrom .. import a as alias\n")
    modules = source_modules(tmp_path, ["pkg"])
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]

    found = {(i.name, i.module_level) for i in imports((pkg / "a.py").read_text(), "pkg.a", False)}
    assert ("ray", True) in found and ("typing.TYPE_CHECKING", True) in found
    assert ("jobs.x", False) in found  # under TYPE_CHECKING: never runs
    assert {("pkg.b", False), ("ray.serve", False)} <= found  # inside a function
    assert ("pkg.sub.c", True) in found  # a class body runs at import
    assert {i.name for i in imports((pkg / "sub" / "c.py").read_text(), "pkg.sub.c", False)} == {"pkg.b", "pkg", "pkg.a"}

    graph = import_graph(modules)
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 6, "pkg.sub": 10, "pkg.sub.c": 10},
                     "pkg.b": {"pkg.a": 1}, "pkg.sub": {}, "pkg.sub.c": {"pkg.b": 1, "pkg.a": 2}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert resolve("pkg.a.f", modules) == "pkg.a" and resolve("numpy.linalg", modules) is None
    # `import ray` at the top counts; jobs.x (TYPE_CHECKING) and ray.serve (in a function) do not
    assert module_level_imports_of(modules, "pkg", ("ray", "jobs")) == [(pkg / "a.py", 1, "ray")]


def test_citation_and_ingress_checkers_on_hand_made_text(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "method.md").write_text("# M\n## 1. One\n## 2. Two\n### 2.1 Sub\n")
    (docs / "ray-notes.md").write_text("| # | a |\n|---|---|\n| 1 | x |\n")
    ok = "see docs/method.md §1, docs/method.md §1–2, docs/method.md §2.1 and docs/ray-notes.md #1"
    assert bad_citations(ok, docs) == []
    assert bad_citations("see method.md §1", docs) == ["line 1: cites method.md: cite docs/method.md"]
    assert bad_citations("\nsee shared/docs/method.md", docs) == ["line 2: cites shared/docs/method.md: cite docs/method.md"]
    assert bad_citations("docs/formats.md §a", docs) == ["line 1: cites docs/formats.md, which does not exist"]
    assert bad_citations("docs/method.md §3", docs) == ["line 1: cites docs/method.md 3, which has no such section"]
    assert bad_citations("docs/method.md §1–§4", docs) == ["line 1: cites docs/method.md 4, which has no such section"]
    assert bad_citations("docs/ray-notes.md #2", docs) == ["line 1: cites docs/ray-notes.md 2, which has no such section"]
    assert bad_citations("docs/method.md §2.\n- a list", docs) == []  # a sentence end is not a range

    (tmp_path / "bad.py").write_text("from __future__ import annotations\nfrom ray import serve\n"
                                     "@serve.deployment\n@serve.ingress(app)\nclass Ingress:\n    pass\n")
    (tmp_path / "good.py").write_text("from ray import serve\n@serve.ingress(app)\nclass Ingress:\n    pass\n")
    (tmp_path / "other.py").write_text("from __future__ import annotations\nclass A:\n    pass\n")
    files = sorted(tmp_path.glob("*.py"))
    assert ingress_modules_with_postponed_annotations(files) == [tmp_path / "bad.py"]


# ----- the rules on this repository ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return source_modules(ROOT)


def test_no_import_cycles(modules: dict[str, Path]) -> None:
    graph = import_graph(modules)
    lines = []
    for comp in find_cycles(graph):
        path = shortest_cycle(graph, comp[0])
        steps = ", ".join(f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(path, path[1:]))
        lines.append(f"cycle among {comp}: {steps}")
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_library_does_not_import_shells_or_ray_at_module_level(modules: dict[str, Path]) -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}"
           for p, line, name in module_level_imports_of(modules, "attribute_ray", FORBIDDEN_IN_LIBRARY)]
    assert not bad, "attribute_ray imports a shell or Ray at module level:\n" + "\n".join(bad)


def test_shell_files_stay_under_300_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for d in SHELLS for p in sorted((ROOT / d).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_SHELL_LINES]
    assert not long, f"files in {SHELLS} must stay under {MAX_SHELL_LINES} lines:\n" + "\n".join(long)


def test_citations_name_existing_docs_and_sections() -> None:
    files = [p for d in (*PACKAGES, "tests", "docs") for p in sorted((ROOT / d).rglob("*"))
             if p.suffix in (".py", ".md", ".yaml", ".yml") and "__pycache__" not in p.parts
             and p != Path(__file__).resolve()]  # this file's examples are wrong on purpose
    files += [p for p in sorted(ROOT.glob("*")) if p.suffix in (".md", ".yaml", ".yml")]
    bad = [f"{p.relative_to(ROOT)}: {problem}" for p in files
           for problem in bad_citations(p.read_text(encoding="utf-8"), ROOT / "docs")]
    assert not bad, "citations of documents that are not in docs/:\n" + "\n".join(bad)


def test_ingress_modules_do_not_postpone_annotations(modules: dict[str, Path]) -> None:
    bad = ingress_modules_with_postponed_annotations(modules.values())
    assert not bad, f"FastAPI misreads postponed annotations (docs/ray-notes.md #1): {[str(p.relative_to(ROOT)) for p in bad]}"
