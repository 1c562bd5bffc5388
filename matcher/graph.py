"""Parameter trees as networkx containment graphs, annotated for matching.

Nodes are path prefixes (the root is ""), edges go from a module to what it contains.
Every node carries: ``depth``, ``params`` (element count below it), ``tensors`` (count),
``shapes`` (multiset of leaf shapes below it), ``tokens`` (role tokens of its own segment)
and, for block templates found by ``solve.blocks``, ``block_count`` and ``stacked``.
The solver reads the tower correspondence and subtree sizes from here.
"""

from __future__ import annotations

import re
from collections import Counter

import networkx as nx

from .tree import ParamTree

_SEPARATOR = re.compile(r"[/.]")


def _parent(path: str) -> str:
    cut = [m.start() for m in _SEPARATOR.finditer(path)]
    return path[: cut[-1]] if cut else ""


def containment_graph(tree: ParamTree, blocks=()) -> nx.DiGraph:
    """The containment tree of ``tree``; ``blocks`` (solve.blocks.Block) are marked on their prefix nodes."""
    from .solve.names import segment_tokens, segments

    graph = nx.DiGraph()
    graph.add_node("", depth=0, params=0, tensors=0, shapes=Counter(), tokens=frozenset())
    for key, spec in tree.specs.items():
        node = key
        graph.add_node(node, depth=len(segments(key)), params=spec.numel, tensors=1, shapes=Counter([spec.shape]),
                       tokens=frozenset(segment_tokens(segments(key)[-1])) if segments(key) else frozenset(), leaf=True)
        while node:
            parent = _parent(node)
            if parent not in graph:
                name = segments(parent)[-1] if parent else ""
                graph.add_node(parent, depth=len(segments(parent)), params=0, tensors=0, shapes=Counter(),
                               tokens=frozenset(segment_tokens(name)) if name else frozenset())
            graph.add_edge(parent, node)
            graph.nodes[parent]["params"] += spec.numel
            graph.nodes[parent]["tensors"] += 1
            graph.nodes[parent]["shapes"][spec.shape] += 1
            node = parent
    for block in blocks:
        graph.add_node(block.prefix, depth=len(segments(block.prefix)), params=sum(s.numel for s in block.leaves.values()) * block.count,
                       tensors=len(block.leaves) * (1 if block.stacked else block.count), shapes=Counter(s.shape for s in block.leaves.values()),
                       tokens=frozenset(), block_count=block.count, stacked=block.stacked)
    return graph


def ancestors(graph: nx.DiGraph, path: str) -> list[str]:
    """Proper ancestors of ``path`` present in the graph, nearest first, root excluded."""
    found = []
    node = _parent(path)
    while node:
        if node in graph:
            found.append(node)
        node = _parent(node)
    return found


def subtree_params(graph: nx.DiGraph, path: str) -> int:
    return graph.nodes[path]["params"] if path in graph else 0
