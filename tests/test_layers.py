"""The layering: runtime/ (serving) never imports convert/ (torch, peft, GGUF writing), nothing
imports the entry script, and runtime/ + convert/ import each other in one direction only.

Every import counts, at the top of a module or inside a function: a lazy import is still a
dependency, it only fails later.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the source folders and the import names they install under (pyproject's package-dir)
PACKAGES = {"qwen_local": "qwen_local", "runtime": "qwen_local.runtime",
            "convert": "qwen_local.convert"}
ENTRY = "qwen_local.cli"


def module_name(path: Path, root: Path) -> str:
    folder, *parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[folder], *parts])


def imports(path: Path, root: Path, known: set[str]) -> set[str]:
    """The modules `path` imports, resolved against the project's own modules: `from a import b`
    is a.b when that is a module, else a; relative imports are made absolute."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports, for runtime/, convert/ and qwen_local/."""
    files = [p for folder in PACKAGES for p in sorted((root / folder).rglob("*.py"))]
    known = {module_name(f, root) for f in files}
    out = {}
    for f in files:
        deps = set()
        for m in imports(f, root, known):
            # a submodule import also names its package; keep the most specific project module
            while m and m not in known:
                m = m.rpartition(".")[0]
            if m:
                deps.add(m)
        out[module_name(f, root)] = deps - {module_name(f, root)}
    return out


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        for dep in sorted(deps):
            if mod.startswith("qwen_local.runtime") and dep.startswith("qwen_local.convert"):
                bad.append(f"{mod} imports {dep} (runtime/ must not import convert/)")
            library = mod.startswith(("qwen_local.runtime", "qwen_local.convert"))
            if dep == ENTRY and library:
                bad.append(f"{mod} imports the entry script {ENTRY}")
    return bad


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package importing its own submodules (an
    __init__ re-exporting them) is no cycle unless a submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_runtime_never_imports_convert_and_nothing_imports_the_entry_script():
    g = graph()
    # the walk found the packages
    assert "qwen_local.runtime.measure" in g and "qwen_local.convert.dev.evaluate" in g
    assert layer_violations(g) == []


def test_no_import_cycle():
    assert cycle(graph()) is None


def test_the_checks_catch_what_they_guard(tmp_path):
    """The same checks on a planted tree: a lazy import of convert/ from runtime/, the entry
    script imported, and a cycle through a relative import."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "qwen_local" / "cli.py").write_text("import sys\n")
    (tmp_path / "runtime" / "engine.py").write_text(
        "def f():\n    from qwen_local.convert.reference import x\n")
    (tmp_path / "convert" / "reference.py").write_text("from . import synthetic\n")
    (tmp_path / "convert" / "synthetic.py").write_text(
        "def g():\n    from qwen_local.convert import reference\nfrom qwen_local import cli\n")
    g = graph(tmp_path)
    assert layer_violations(g) == [
        "qwen_local.convert.synthetic imports the entry script qwen_local.cli",
        "qwen_local.runtime.engine imports qwen_local.convert.reference "
        "(runtime/ must not import convert/)"]
    assert cycle(g) == ["qwen_local.convert.reference", "qwen_local.convert.synthetic",
                        "qwen_local.convert.reference"]


def test_public_api_resolves_and_importing_the_packages_stays_light():
    """Each package's __all__ names something real; `import runtime, convert` loads neither torch
    nor llama.cpp nor FastAPI (the names are imported on first use)."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom qwen_local import runtime, convert\n"
            "heavy = [m for m in ('torch', 'peft', 'llama_cpp', 'fastapi') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "for pkg in (runtime, convert):\n"
            "    for name in pkg.__all__:\n"
            "        getattr(pkg, name)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_modules_and_functions_stay_small():
    """Modules of at most 450 lines and functions of at most 80 (tests included), so that each
    stays readable whole."""
    too_long = []
    for folder in (*PACKAGES, "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if text.count("\n") > 450:
                too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text, str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        too_long.append(f"{path.relative_to(ROOT)}: {node.name} is {n} lines")
    assert too_long == []
