"""The house rules, checked: pdpipe's imports (at module level, inside functions and under
TYPE_CHECKING) form no cycle and never reach a layer above their own, but for the package's lazy
`__getattr__`; no folder at the repo root but `pdpipe/` is a package (a top-level `kernels/` once
shadowed Hugging Face's `kernels`, which `transformers` imports); the front-end and the scheduler
load no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/unit/ → the repo root
PACKAGE = ROOT / "pdpipe"

# Lowest first: a module may import its own layer and those below. Each entry is a module or a package
# (its modules and subpackages belong to it unless listed on their own).
LAYERS = [
    ["pdpipe", "pdpipe.envs", "pdpipe.messages", "pdpipe.tombstones", "pdpipe.gpus", "pdpipe.cli_args",
     "pdpipe.kv_hash", "pdpipe.kv_events"],
    ["pdpipe.config"],
    ["pdpipe.wire", "pdpipe.cluster", "pdpipe.transfer.base"],
    ["pdpipe.loop"],
    ["pdpipe.kernels"],
    ["pdpipe.models", "pdpipe.quant", "pdpipe.demo", "pdpipe.tokenizer", "pdpipe.output"],
    ["pdpipe.ipc", "pdpipe.rdma"],
    ["pdpipe.engine"],
    ["pdpipe.transfer"],
    ["pdpipe.scheduler"],
    ["pdpipe.api"],
    ["pdpipe.relay", "pdpipe.llm", "pdpipe.inspect", "pdpipe.launcher", "pdpipe.bench", "pdpipe.process",
     "pdpipe.cli"],
]
LAZY_FACADE = ("pdpipe", "pdpipe.llm")  # `from pdpipe import LLM` imports the engine only when asked


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[tuple[str, bool]]:
    """The pdpipe modules `name` imports, each with whether the import sits in the package's lazy
    `__getattr__`."""
    tree = ast.parse(path.read_text())
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            and name == "pdpipe" for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                edges.add((target, id(node) in lazy))
    return edges


def layer_of(name: str) -> int:
    best, layer = "", -1
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > len(best):
                best, layer = entry, i
    assert layer >= 0, f"{name}: in no layer of LAYERS"
    return layer


def graph() -> dict[str, set[tuple[str, bool]]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_every_import_goes_down_or_sideways():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, edges in graph().items() for b, lazy in edges
              if layer_of(b) > layer_of(a) and not (lazy and (a, b) == LAZY_FACADE)]
    assert not upward, "\n".join(upward)


def test_imports_form_no_cycle():
    edges = {a: {b for b, lazy in bs if not lazy} for a, bs in graph().items()}
    cycles, state = [], dict.fromkeys(edges, 0)  # 0 new, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if state[start] == 0:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a cycle through a function-level import, and a lower layer
    importing a higher one, are both caught."""
    (tmp_path / "pdpipe" / "models").mkdir(parents=True)
    (tmp_path / "pdpipe" / "__init__.py").write_text("")
    (tmp_path / "pdpipe" / "models" / "__init__.py").write_text("")
    (tmp_path / "pdpipe" / "models" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "pdpipe" / "models" / "b.py").write_text("from pdpipe.models.a import f\nimport pdpipe.engine\n")
    (tmp_path / "pdpipe" / "engine.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "pdpipe")
    g = graph()
    assert ("pdpipe.models.b", False) in g["pdpipe.models.a"] and ("pdpipe.models.a", False) in g["pdpipe.models.b"]
    assert ("pdpipe.engine", False) in g["pdpipe.models.b"] and layer_of("pdpipe.engine") > layer_of("pdpipe.models.b")


def test_no_folder_at_the_root_but_pdpipe_is_a_package():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["pdpipe"], packages


def test_transformers_imports_with_the_repo_root_first_on_the_path():
    """Hugging Face's `kernels` (imported by transformers) is the installed package, never a folder of
    ours, whether the root is first on sys.path (pytest, `python` run there, PYTHONPATH on the GPU
    machine)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, transformers; "
            "from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM, Ernie4_5_MoeForCausalLM; "
            "from transformers.integrations import hub_kernels; print(kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "site-packages" in Path(run.stdout.strip()).parts, run.stdout  # installed, not a folder of the repo


def test_the_front_end_and_the_scheduler_load_no_torch():
    """They size requests with engine.sizing's arithmetic, not the engine: importing them and sizing the
    demo model (made beforehand) loads no torch."""
    from pdpipe.demo import resolve_model

    resolve_model("")
    code = ("import sys; import pdpipe.api.server, pdpipe.scheduler.service; from pdpipe.config import EngineConfig; "
            "from pdpipe.demo import resolve_model; from pdpipe.models.spec import load_spec; "
            "from pdpipe.engine.sizing import pool_blocks, resolve_max_model_len; "
            "spec = load_spec(resolve_model('')); cfg = EngineConfig(); "
            "assert resolve_max_model_len(spec, cfg, pool_blocks(spec, cfg)) > 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
