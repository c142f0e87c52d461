"""The packages' layering: the library never imports the entry points, the image tokenizer
stands alone, only the Shapes package knows Shapes, and no two modules import each other
(at any depth, lazily or not)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chameleon_jax", "vqvae", "train", "eval")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (`from a import b` counts a and a.b)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def project_modules() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    names = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports_of(p) if m in names} for p in files}


def test_library_never_imports_train_or_eval():
    bad = {mod: sorted(m for m in deps if m.split(".")[0] in ("train", "eval"))
           for mod, deps in project_modules().items() if mod.split(".")[0] in ("chameleon_jax", "vqvae")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_vqvae_never_imports_chameleon_jax():
    bad = {mod: sorted(m for m in deps if m.split(".")[0] != "vqvae")
           for mod, deps in project_modules().items() if mod.split(".")[0] == "vqvae"}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_library_knows_documents_not_the_shapes_data_set():
    shapes = "chameleon_jax.data.shapes"
    bad = {mod: sorted(m for m in deps if m == shapes or m.startswith(shapes + "."))
           for mod, deps in project_modules().items()
           if mod.split(".")[0] == "chameleon_jax" and not (mod == shapes or mod.startswith(shapes + "."))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_evaluations_and_tools_import_nothing_of_each_other():
    def tool(m: str) -> bool:
        return m == "eval.bench" or m.startswith("eval.bench.")

    bad = {mod: sorted(m for m in deps if m.startswith("eval.") and tool(m) != tool(mod))
           for mod, deps in project_modules().items() if mod.startswith("eval.")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_import_cycles():
    graph = project_modules()
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_vqvae_imports_and_runs_with_chameleon_jax_unavailable():
    code = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("chameleon_jax", "train", "eval"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
import vqvae
for info in pkgutil.walk_packages(vqvae.__path__, "vqvae."):
    importlib.import_module(info.name)
cfg = vqvae.configlib.apply_overrides(vqvae.VQ_PRESETS["tiny"](), ["codebook_size=32"])
from vqvae.model import create_model
tok = vqvae.Tokenizer(create_model(cfg))
print(tok.encode(np.zeros((1, 16, 16, 3), np.uint8)).shape)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 4, 4)"
