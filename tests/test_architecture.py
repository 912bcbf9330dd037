"""The package structure holds: no import cycle in `mllm/`, and each layer imports only the layers below it
(`mllm` <- `training` <- `app`). Read from the source (every import, module level or inside a function), so
an import hidden in a function to dodge a cycle counts too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("mllm", "training", "app")  # each may import the ones before it, never those after


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The project modules `path` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that starts and ends on the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_mllm():
    graph = _graph()
    packages = {m for m in graph if (REPO / m.replace(".", "/") / "__init__.py").is_file()}
    # Importing any module runs its package's __init__ first: those implicit edges are how packages work,
    # so a package's own modules must never import the package itself (`from mllm import X` inside mllm/).
    inward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if d in packages and m.startswith(d + ".")]
    assert not inward, inward
    core = {m: {d for d in deps if d.startswith("mllm")} for m, deps in graph.items() if m.startswith("mllm")}
    assert _cycle(core) is None, " -> ".join(_cycle(core))


def test_layers_import_only_downwards():
    graph = _graph()
    wrong = []
    for module, deps in graph.items():
        rank = LAYERS.index(module.split(".")[0])
        wrong += [f"{module} -> {d}" for d in deps if LAYERS.index(d.split(".")[0]) > rank]
    assert not wrong, wrong


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a lazy import inside a function is an edge like any other."""
    graph = {"mllm.a": {"mllm.b"}, "mllm.b": {"mllm.a"}, "mllm.c": set()}
    assert _cycle(graph) == ["mllm.a", "mllm.b", "mllm.a"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mllm.model import MLLM\n")
    assert _imports(source, {"mllm.model"}, name="mllm.m") == {"mllm.model"}


def test_loading_a_checkpoint_never_calls_back_up_the_path(tiny_model, tmp_path):
    """Loading walks down: no call goes back into a module that is already on the call path (the old loader
    went model -> checkpoint -> interop -> model ...)."""
    import sys

    from mllm.checkpoint import save_pretrained
    from mllm.loading import load_model

    save_pretrained(tiny_model, tmp_path / "ckpt")
    root = str(REPO / "mllm") + "/"
    back_calls = []

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(root):
            return
        files, caller = [], frame.f_back
        while caller is not None:
            if caller.f_code.co_filename.startswith(root) and (not files or files[-1] != caller.f_code.co_filename):
                files.append(caller.f_code.co_filename)
            caller = caller.f_back
        if files and files[0] != frame.f_code.co_filename and frame.f_code.co_filename in files:
            back_calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name} via {files[::-1]}")

    sys.setprofile(profile)
    try:
        load_model(str(tmp_path / "ckpt"), device="cpu")
    finally:
        sys.setprofile(None)
    assert not back_calls, back_calls[:5]


def test_the_readme_module_map_matches_the_tree():
    """Every module of the three layers has its line in the README's Layout table, and every module the table
    names exists. In a row, a bare `name.py` lives in the folder of the row's first path."""
    import re

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout") : readme.index("## Checkpoint format")]
    named = set()
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        paths = re.findall(r"`([\w/]+(?:\.py|/))`", row)
        if not paths:
            continue
        folder = paths[0] if paths[0].endswith("/") else paths[0].rpartition("/")[0] + "/"
        named |= {p if "/" in p else folder + p for p in paths if p.endswith(".py")}
    actual = {
        str(p.relative_to(REPO))
        for layer in LAYERS
        for p in (REPO / layer).rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "mllm"
    }
    assert not actual - named, f"modules missing from the README's Layout: {sorted(actual - named)}"
    assert not named - actual - {"scripts/bench_*.py"}, (
        f"the README names modules that do not exist: {sorted(named - actual)}"
    )


# The decode backends and the modules that only they use. Everything else decodes through `model.backend`.
BACKEND_MODULES = {"mllm.backends.llamacpp", "mllm.backends.torch_backends", "mllm.int4_decode", "mllm.batch_decode"}
BACKEND_NAMES = {
    "int4_decoder",
    "transformers_batch",
    "Int4Decoder",
    "TransformersBatch",
    "LlamaCppBackend",
    "llama_cpp",
}


def test_no_module_outside_the_backends_names_one():
    """The backend is chosen once at load (`mllm.backends.select`); no other module imports a backend's module
    or names its classes, so nothing works the choice out again at run time."""
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    offenders = []
    for path in files:
        name = _module_name(path)
        if name.startswith("mllm.backends") or name in BACKEND_MODULES:
            continue
        imported = _imports(path, modules | {"llama_cpp"}) & (BACKEND_MODULES | {"llama_cpp"})
        tree = ast.parse(path.read_text())
        named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & BACKEND_NAMES
        named |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & BACKEND_NAMES
        if imported or named:
            offenders.append(f"{name}: {sorted(imported | named)}")
    assert offenders == []
