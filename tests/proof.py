"""Mutations of a known mapping that a proof of that mapping must reject.

A proof that still passes after a rule is removed or a transpose is flipped proves
nothing about that rule, so every family test runs its proof over these mutants.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from matcher.mapping import Mapping
from matcher.ops import Transpose


def _flipped(op: Transpose) -> Transpose | None:
    """The transpose a careless converter would write instead: the reversed permutation
    for 2-d kernels (i.e. no transpose at all), the inverse permutation otherwise."""
    if op.perm == tuple(reversed(range(len(op.perm)))) and len(op.perm) == 2:
        return None  # dropping a 2-d transpose is the flip
    inverse = op.reverse()
    if inverse.perm == op.perm:
        return None
    return inverse


def mutants(mapping: Mapping) -> Iterator[tuple[str, Mapping]]:
    """Every mapping one mistake away: one rule removed, or one transpose flipped."""
    rules = list(mapping.rules)
    for k, rule in enumerate(rules):
        yield f"without rule {rule.target}", replace(mapping, rules=tuple(rules[:k] + rules[k + 1 :]))
    for k, rule in enumerate(rules):
        for j, op in enumerate(rule.ops):
            if not isinstance(op, Transpose):
                continue
            flipped = _flipped(op)
            ops = list(rule.ops[:j]) + ([flipped] if flipped else []) + list(rule.ops[j + 1 :])
            changed = replace(rule, ops=tuple(ops))
            yield (
                f"{rule.target}: transpose {list(op.perm)} -> {list(flipped.perm) if flipped else 'none'}",
                replace(mapping, rules=tuple(rules[:k] + [changed] + rules[k + 1 :])),
            )
