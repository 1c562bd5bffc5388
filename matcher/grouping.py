"""Items joined into groups when they share a key, directly or through other items."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def groups_sharing(items: Sequence[T], keys: Callable[[T], Iterable[Hashable]]) -> list[list[T]]:
    """``items`` in groups: two items are in one group when they share a key (transitively).
    Each group keeps the items' order; groups come in the order of their first item."""
    parent = list(range(len(items)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_holder: dict[Hashable, int] = {}
    for index, item in enumerate(items):
        for key in keys(item):
            if key in first_holder:
                a, b = root(first_holder[key]), root(index)
                parent[max(a, b)] = min(a, b)  # the earliest item is its group's root
            else:
                first_holder[key] = index
    groups: dict[int, list[T]] = {}
    for index, item in enumerate(items):
        groups.setdefault(root(index), []).append(item)
    return list(groups.values())
