"""The package keeps its shape: every import points down the layer table of docs/design.md, and no imports run
in a circle.

The table ("## Layers") lists the layers from the top down, each with the modules it holds (dotted names below
`fedmole`, `__init__` for the package's own `__init__.py`). A module belongs to the row naming the longest
prefix of its dotted name, so `engines.flower.records`, named in the `engines` row, is there, while
`engines.flower.serverapp` belongs to the applications row, which names the package `engines.flower`. Every import of `fedmole/` counts: at module level, inside functions and under
`TYPE_CHECKING`, found by parsing the source (nothing is imported). A bare `import fedmole` (for the package's
`__file__`) adds no dependency: every module of the package has already loaded it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedmole"
DESIGN = ROOT / "docs" / "design.md"
INIT = "__init__"  # the package's own fedmole/__init__.py in the table

# Imports that still go up, as (importing prefix, imported prefix): the reason, and who removes it. An entry
# that no longer matches any import fails the test, so the list only shrinks.
PENDING: dict[tuple[str, str], str] = {}


def module_names() -> dict[str, Path]:
    """Dotted name below `fedmole` (`client.runtime`; a package by its own name; the root `__init__`) -> file."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of one fedmole module by another."""
    edges = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):  # import fedmole.a.b
                targets = [a.name for a in node.names if a.name != "fedmole"]
            elif isinstance(node, ast.ImportFrom):  # from fedmole.a import b: module a.b if there is one, else a
                assert not node.level, f"{path}:{node.lineno}: use an absolute import (from fedmole.x import ...)"
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if _relative(t) in mods else node.module for t in targets]
            else:
                continue
            for target in targets:
                target = _relative(target)
                if target in mods and target != name:
                    edges.append((name, target, node.lineno))
    return edges


def _relative(dotted: str) -> str | None:
    """`fedmole.client.runtime` -> `client.runtime`; `fedmole` -> `__init__`; None outside the package."""
    if dotted == "fedmole":
        return INIT
    return dotted.removeprefix("fedmole.") if dotted.startswith("fedmole.") else None


def layer_table() -> list[tuple[str, list[str]]]:
    """[(layer, [module prefixes])] from the top layer down, as docs/design.md's "## Layers" table lists them."""
    text = DESIGN.read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # skip header and rule
    table = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table.append((cells[0], re.findall(r"`([\w.]+)`", cells[1])))
    return table


def under(name: str, entry: str) -> bool:
    """Whether module `name` falls under table entry `entry` (the entry itself or a dotted prefix of it)."""
    return name == entry or (entry != INIT and name.startswith(entry + "."))


def place(name: str, entries) -> str | None:
    """The table entry `name` belongs to: the longest one it falls under."""
    hits = [e for e in entries if under(name, e)]
    return max(hits, key=len) if hits else None


def layering():
    """(modules, import edges, entry -> depth: 0 for the top layer, entry -> layer name)."""
    mods = module_names()
    table = layer_table()
    depth = {p: i for i, (_, prefixes) in enumerate(table) for p in prefixes}
    layer = {p: layer for layer, prefixes in table for p in prefixes}
    return mods, imports(mods), depth, layer


def where(name: str, line: int, mods: dict[str, Path]) -> str:
    return f"{mods[name].relative_to(ROOT)}:{line}"


def test_the_layer_table_places_every_module_once():
    mods, _, depth, _ = layering()
    entries = [p for _, prefixes in layer_table() for p in prefixes]
    assert len(entries) == len(set(entries)), f"a module is listed in two rows of {DESIGN.name}: {entries}"
    unplaced = [m for m in mods if place(m, depth) is None]
    assert not unplaced, (f"{unplaced} have no layer: add them to the table under '## Layers' in "
                          f"docs/design.md (the row of the lowest layer they may sit in)")
    stale = [p for p in entries if not any(place(m, depth) == p for m in mods)]
    assert not stale, f"the layer table in docs/design.md names modules that do not exist: {stale}"


def test_no_module_imports_from_a_layer_above_its_own():
    mods, edges, depth, layer = layering()
    upward, used = [], set()
    for src, dst, line in edges:
        a, b = place(src, depth), place(dst, depth)
        if a is None or b is None or depth[b] >= depth[a]:  # unplaced: the table test names them
            continue
        known = [k for k in PENDING if under(src, k[0]) and under(dst, k[1])]
        if known:
            used.update(known)
            continue
        upward.append(f"{where(src, line, mods)}: fedmole.{src} (layer {layer[a]}) imports fedmole.{dst} "
                      f"(layer {layer[b]}, above it)")
    assert not upward, ("imports must point down the layer table of docs/design.md; move what is needed down, "
                        "or move the importer up:\n  " + "\n  ".join(upward))
    stale = sorted(set(PENDING) - used)
    assert not stale, f"these PENDING upward imports are gone; remove them from tests/test_layers.py: {stale}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one circle through them."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(circle(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One path a -> ... -> a through the component (breadth-first from its smallest module)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no circle through {component}")  # a component always has one


def test_no_imports_run_in_a_circle():
    mods, edges, _, _ = layering()
    graph = {m: set() for m in mods}
    lines = {}
    for src, dst, line in edges:
        graph[src].add(dst)
        lines.setdefault((src, dst), line)
    found = cycles(graph)
    shown = [" -> ".join(f"fedmole.{m}" for m in c) + "\n    " + ", ".join(
        f"{where(a, lines[a, b], mods)} imports fedmole.{b}" for a, b in zip(c, c[1:])) for c in found]
    assert not found, "import circles (break each by moving what is shared down a layer):\n  " + "\n  ".join(shown)


def test_message_types_are_imported_from_messages():
    """Payload, Reply, ClientState and Tensors live in fedmole/messages.py and are imported from there, not from a
    module that happens to import them (no re-exports)."""
    names = {"Payload", "Reply", "ClientState", "Tensors"}
    wrong = []
    for path in [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedmole") \
                    and node.module != "fedmole.messages" and names & {a.name for a in node.names}:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names & {a.name for a in node.names}} "
                             f"from {node.module}")
            if isinstance(node, ast.Assign) and path.name != "messages.py" \
                    and any(isinstance(t, ast.Name) and t.id == "Tensors" for t in node.targets):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} defines its own Tensors")
    assert not wrong, "import the message types from fedmole.messages:\n  " + "\n  ".join(wrong)
