"""Fail when any two of the project's modules import each other, directly or round a circle.

`make lint` runs it after `lint-imports`. import-linter's ``acyclic_siblings`` contract
(pyproject.toml) forbids cycles between sibling modules and packages, but it cannot see two
kinds of circle: a package's ``__init__`` importing one of its own modules that imports the
package back, and a circle through two root packages. This check looks at the module graph
itself: every strongly connected component of more than one module is a circle, printed
with one chain round it and the lines that make each import.

Every import counts, as it does for the contracts: module-level, inside functions (lazy) and
under ``TYPE_CHECKING``. A lazy or type-only import does not fail at import time, but it
still ties the two modules together: a change to either can break the other, and the
circles the layout issue named were of both kinds.

Run: ``python scripts/check_import_cycles.py [PACKAGE ...] [--path DIR ...]``; the packages
default to hessian_service, hessian_client and bench. Exit status 0 without a circle, 1
with one (each printed).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hessian_service", "hessian_client", "bench")
# Where the packages live in the checkout: the client's source is under clients/python.
SOURCE_DIRS = (ROOT, ROOT / "clients" / "python")


@dataclass(frozen=True)
class Import:
    """One module importing another, with the lines that do it (``l.12: import x``)."""

    importer: str
    imported: str
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported}  ({'; '.join(self.lines)})"


@dataclass(frozen=True)
class Cycle:
    """A strongly connected component: its modules, and one shortest circle through them."""

    modules: tuple[str, ...]
    chain: tuple[Import, ...]


def _grimp_graph(packages: Iterable[str]) -> grimp.ImportGraph:
    """The packages' import graph: every import statement in a module, lazy and
    ``TYPE_CHECKING`` ones too; imports of other packages are left out."""
    return grimp.build_graph(
        *packages,
        include_external_packages=False,
        exclude_type_checking_imports=False,
        cache_dir=None,
    )


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module, each sorted, in order.

    Tarjan's algorithm, iterative so that a deep import chain cannot hit the recursion limit.
    """
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[tuple[str, ...]] = []
    for start in sorted(graph):
        if start in index:
            continue
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(sorted(graph[start])))]
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in graph:
                    continue
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(tuple(sorted(component)))
    return sorted(components)


def shortest_circle(graph: Mapping[str, Iterable[str]], component: Sequence[str]) -> list[str]:
    """The modules of a shortest circle from ``component[0]`` back to itself, inside it."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor in members and successor not in previous:
                previous[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is in a strongly connected component but on no circle")


def find_cycles(packages: Iterable[str]) -> list[Cycle]:
    """Every import circle among the modules of ``packages``, with a chain round each."""
    grimp_graph = _grimp_graph(packages)
    graph = {
        module: frozenset(grimp_graph.find_modules_directly_imported_by(module))
        for module in grimp_graph.modules
    }
    cycles = []
    for component in strongly_connected(graph):
        circle = shortest_circle(graph, component)
        chain = tuple(
            Import(importer, imported, _lines(grimp_graph, importer, imported))
            for importer, imported in itertools.pairwise(circle)
        )
        cycles.append(Cycle(modules=component, chain=chain))
    return cycles


def _lines(graph: grimp.ImportGraph, importer: str, imported: str) -> tuple[str, ...]:
    details = graph.get_import_details(importer=importer, imported=imported)
    return tuple(f"l.{d['line_number']}: {d['line_contents']}" for d in details)


def report(cycles: Sequence[Cycle], packages: Sequence[str]) -> str:
    """What the check prints: one block per circle, or one line when there is none."""
    names = ", ".join(packages)
    if not cycles:
        return f"No import cycles among {names}."
    blocks = [f"{len(cycles)} import cycle(s) among {names}:"]
    for number, cycle in enumerate(cycles, start=1):
        lines = [f"cycle {number} ({len(cycle.modules)} modules): {', '.join(cycle.modules)}"]
        lines += [f"  {step}" for step in cycle.chain]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES))
    parser.add_argument(
        "--path",
        action="append",
        type=Path,
        help="a directory to find the packages in (default: the checkout and clients/python)",
    )
    args = parser.parse_args(argv)
    for directory in reversed(args.path or SOURCE_DIRS):
        sys.path.insert(0, str(directory))
    importlib.invalidate_caches()
    cycles = find_cycles(args.packages)
    print(report(cycles, args.packages))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
