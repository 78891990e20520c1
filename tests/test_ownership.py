"""Every fact has one owner: the architecture's rules, read from the source (no jax, no models).

- no import cycle among bco_jax's modules, counting imports inside functions and TYPE_CHECKING blocks;
- no module of bco_jax over 400 lines;
- a projection's names, a batch field's name and an output file's name appear as string literals only
  in their owners: models/projections.py, data/batch.py, run_dir.py;
- bench/ and experiments/ import public names without sys.path edits; nothing reads jax._src.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bco_jax"
MAX_LINES = 400


def modules(folder: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under `folder` (packages as their __init__)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def _resolve(name: str, names: dict) -> str | None:
    """The longest known module that `name` is or lies in."""
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: pathlib.Path) -> set[str]:
    """bco_jax modules `module` imports anywhere in its file (top level, functions, TYPE_CHECKING);
    `from pkg import sub` counts as importing the submodule, and a lazy package's table of
    `importlib.import_module` targets (`_WHERE`) counts as imports too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_WHERE" for t in node.targets):
            found.update(f"{package}.{v.value}" for v in ast.walk(node.value)
                         if isinstance(v, ast.Constant) and f"{package}.{v.value}" in MODULES)
    return {m for m in (_resolve(name, MODULES) for name in found if name.startswith("bco_jax")) if m != module}


def test_no_import_cycle():
    graph = {m: imports_of(m, p) for m, p in MODULES.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    # The rule above must not pass vacuously: an import inside a function is an edge.
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from bco_jax import build\n", encoding="utf-8")
    assert "bco_jax.build" in imports_of("bco_jax.step", path)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# ------------------------------------------------------------------------------------- literals


def string_literals(path: pathlib.Path):
    """(line, text) of every string constant of a file, f-string pieces included, docstrings not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def projection_patterns() -> list[re.Pattern]:
    from bco_jax.models.projections import PROJECTIONS

    exact = {name for p in PROJECTIONS.values() for name in (p.name, p.bias)}
    words = {name for p in PROJECTIONS.values() for name in (p.module, p.peft)}
    return ([re.compile(rf"^{re.escape(n)}$") for n in sorted(exact)]
            + [re.compile(rf"(?<![\w]){re.escape(n)}(?![\w])") for n in sorted(words)])


def batch_patterns() -> list[re.Pattern]:
    from bco_jax.data.batch import PAIR_SIDES, Batch, Sequences

    # The fields that only a batch has (generic words such as "labels" or "weights" are not claimed),
    # with the prefixed forms the old dict batch used (chosen_input_ids, kl_loss_mask, ...).
    generic = {"labels", "weights", "main", "kl", "shape", "positions", *PAIR_SIDES}
    fields = {f.name for cls in (Sequences, Batch) for f in dataclasses.fields(cls)} - generic
    fields |= {"completion_capacity"}
    prefixes = "|".join(f"{p}_" for p in (*PAIR_SIDES, "kl"))
    return [re.compile(rf"^(?:{prefixes})?{re.escape(f)}$") for f in sorted(fields)]


def output_patterns() -> list[re.Pattern]:
    from bco_jax import run_dir

    # The run directory's own names; "config.json", "hf", "model" ... are also HF's or generic words.
    names = [v for k, v in vars(run_dir).items() if k.isupper() and isinstance(v, str) and "." in v]
    names += [run_dir.CHECKPOINTS]  # ("tensorboard" is also a config key)
    names = [n for n in names if n != "config.json"]
    return [re.compile(rf"(?<![\w.]){re.escape(n)}$") for n in sorted(set(names))]


# Literals that name something else with the same spelling: (file, text) -> why.
ALLOWED = {
    ("bco_jax/data/tokenize.py", "input_ids"): "the tokenizer's output key (transformers), not a batch field",
    ("bco_jax/data/tokenize.py", "attention_mask"): "the tokenizer's output key (transformers)",
}

OWNERS = {
    "projection": ("bco_jax/models/projections.py", projection_patterns),
    "batch field": ("bco_jax/data/batch.py", batch_patterns),
    "output file": ("bco_jax/run_dir.py", output_patterns),
}
SCANNED = sorted({*MODULES.values(), *modules(ROOT / "bench").values(), *modules(ROOT / "experiments").values()})


@pytest.mark.parametrize("kind", sorted(OWNERS))
def test_facts_are_spelled_only_by_their_owner(kind):
    owner, patterns = OWNERS[kind]
    patterns = patterns()
    assert patterns, f"no {kind} names found: the owner moved?"
    found = []
    for path in SCANNED:
        rel = str(path.relative_to(ROOT))
        if rel == owner:
            continue
        for line, text in string_literals(path):
            if (rel, text) not in ALLOWED and any(p.search(text) for p in patterns):
                found.append(f"{rel}:{line}: {text!r}")
    assert not found, f"{kind} names spelled outside {owner}:\n" + "\n".join(found)


def test_the_literal_scan_sees_a_stray_name(tmp_path):
    path = tmp_path / "stray.py"
    path.write_text('x = batch["chosen_input_ids"]\ny = f"{d}/metrics.jsonl"\nz = "self_attn.q_proj"\n',
                    encoding="utf-8")
    texts = [t for _, t in string_literals(path)]
    for patterns in (batch_patterns(), output_patterns(), projection_patterns()):
        assert any(p.search(t) for p in patterns for t in texts)


def test_bench_and_experiments_need_no_path_edits_and_nothing_reads_jax_internals():
    offenders = []
    for path in SCANNED:
        text = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(ROOT))
        if "sys.path.insert" in text or "sys.path.append" in text:
            offenders.append(f"{rel}: edits sys.path")
        if rel.startswith("bco_jax/") and _reads_jax_internals(path):
            offenders.append(f"{rel}: reads jax._src")
        for line, name in _private_imports(path):
            offenders.append(f"{rel}:{line}: imports private {name}")
    assert not offenders, "\n".join(offenders)


def _reads_jax_internals(path: pathlib.Path) -> bool:
    """An import of jax._src, or an attribute `jax._src` (a logger's name is only a string)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.startswith("jax._src") for n in names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "_src" and getattr(node.value, "id", "") == "jax":
            return True
    return False


def _private_imports(path: pathlib.Path):
    """bench/ and experiments/ import only public names of bco_jax."""
    if str(path.relative_to(ROOT)).startswith("bco_jax/"):
        return
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bco_jax"):
            for alias in node.names:
                if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split(".")):
                    yield node.lineno, f"{node.module}.{alias.name}"
