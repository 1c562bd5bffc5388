"""Names as evidence: tokens, synonym roles, sibling order, and a similarity score.

The synonym table is data (synonyms.yaml). A path segment is looked up whole first
(``q_proj``, ``c_fc``, ``encoder_norm``), then split on '_', camelCase and digits.
Numbers become order tokens: ``LayerNorm_0``/``LayerNorm_1`` and ``layer_norm1``/
``layer_norm2`` both read as the first and second of their siblings.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import MatcherError

SYNONYMS_FILE = Path(__file__).with_name("synonyms.yaml")
_SPLIT_SEGMENTS = re.compile(r"[/.]")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_TRAILING_NUMBER = re.compile(r"^(.*?)[_]?(\d+)$")


@dataclass(frozen=True)
class Synonyms:
    role_of: dict[str, str]
    fused: dict[str, tuple[str, ...]]
    ordinals: dict[str, int]
    not_parameters: frozenset[str]
    implied_by_leaf: dict[str, str]
    hidden_layouts: tuple[tuple[tuple[str, ...], str], ...] = ()  # (source patterns, note)


@functools.lru_cache(maxsize=None)
def synonyms(path: Path = SYNONYMS_FILE) -> Synonyms:
    import yaml

    data = yaml.safe_load(path.read_text())
    unknown = set(data) - {"roles", "fused", "ordinals", "not_parameters", "implied_by_leaf", "hidden_layouts"}
    if unknown:
        raise MatcherError(f"unknown section(s) {sorted(unknown)}", path=str(path))
    role_of: dict[str, str] = {}
    for role, spellings in data["roles"].items():
        for spelling in spellings:
            spelling = str(spelling).lower()
            if spelling in role_of and role_of[spelling] != role:
                raise MatcherError(f"spelling {spelling!r} listed under roles {role_of[spelling]!r} and {role!r}", path=str(path))
            role_of[spelling] = role
    fused = {k.lower(): tuple(v) for k, v in data.get("fused", {}).items()}
    ordinals = {k.lower(): int(v) for k, v in data.get("ordinals", {}).items()}
    not_parameters = frozenset(str(s).lower() for s in data.get("not_parameters", []))
    implied = {str(k).lower(): str(v) for k, v in (data.get("implied_by_leaf") or {}).items()}
    hidden = tuple((tuple(str(p) for p in entry["sources"]), " ".join(str(entry["note"]).split())) for entry in data.get("hidden_layouts") or ())
    return Synonyms(role_of, fused, ordinals, not_parameters, implied, hidden)


def hidden_layout_note(source_template: str) -> str | None:
    """The note of the first ``hidden_layouts`` entry whose patterns match ``source_template``."""
    for patterns, note in synonyms().hidden_layouts:
        if any(fnmatch.fnmatchcase(source_template, pattern) for pattern in patterns):
            return note
    return None


def is_training_state(path: str) -> bool:
    """True for optimizer moments and similar state stored beside the parameters."""
    marks = synonyms().not_parameters
    return any(segment.lower() in marks for segment in segments(path))


def segments(path: str) -> list[str]:
    return [s for s in _SPLIT_SEGMENTS.split(path) if s]


def words(segment: str) -> list[str]:
    return [w.lower() for w in _WORDS.findall(segment)]


def segment_tokens(segment: str) -> set[str]:
    """Role tokens of one path segment, numbers excluded (they become order tokens)."""
    table = synonyms().role_of
    lower = segment.lower()
    stem = _TRAILING_NUMBER.match(lower)
    whole = stem.group(1) if stem else lower
    for candidate in (lower, whole):
        if candidate in table:
            return {table[candidate]}
    tokens = set()
    for word in words(segment):
        if word.isdigit():
            continue
        tokens.add(table.get(word, word))
    return tokens


def fused_parts(path: str) -> tuple[str, ...] | None:
    """The roles packed in a fused tensor (``qkv`` -> query, key, value), if its name says so."""
    table = synonyms().fused
    for segment in reversed(segments(path)):
        lower = segment.lower()
        for candidate in [lower] + [w for w in re.split(r"[_]", lower)] + words(segment):
            if candidate in table:
                return table[candidate]
        if "_" in lower:
            for name, parts in table.items():
                if lower.startswith(name + "_") or lower.endswith("_" + name):
                    return parts
    return None


def sibling_orders(paths: Iterable[str]) -> dict[tuple[str, int], int]:
    """Order tokens: (path prefix through the segment, segment index) -> rank among siblings.

    Siblings share the parent path and the segment's stem; a lone sibling has no order.
    """
    groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    located: dict[tuple[str, int], tuple[tuple[str, str], int]] = {}
    for path in paths:
        parts = segments(path)
        for index, segment in enumerate(parts):
            match = _TRAILING_NUMBER.match(segment)
            if not match or not match.group(1):
                ordinal = synonyms().ordinals.get(segment.lower().rsplit("_", 1)[-1])
                if ordinal is None:
                    continue
                key = ("/".join(parts[:index]), segment.lower().rsplit("_", 1)[0] + "_#ord")
                groups[key].add(ordinal)
                located[("/".join(parts[: index + 1]), index)] = (key, ordinal)
                continue
            key = ("/".join(parts[:index]), match.group(1).lower())
            number = int(match.group(2))
            groups[key].add(number)
            located[("/".join(parts[: index + 1]), index)] = (key, number)
    ranks: dict[tuple[str, int], int] = {}
    for where, (key, number) in located.items():
        members = sorted(groups[key])
        if len(members) > 1:
            ranks[where] = members.index(number)
    return ranks


@dataclass(frozen=True)
class NameInfo:
    tokens: frozenset[str]
    orders: tuple[int, ...]  # order tokens along the path, innermost last
    last: str  # role of the last segment (weight, bias, ...)
    text: str


def describe_names(paths: Sequence[str]) -> dict[str, NameInfo]:
    """NameInfo for each path, with order tokens computed among these paths."""
    ranks = sibling_orders(paths)
    implied_by_parent: dict[str, set[str]] = defaultdict(set)  # a 'scale' leaf makes its module a norm, bias included
    for path in paths:
        parts = segments(path)
        implied = synonyms().implied_by_leaf.get(parts[-1].lower()) if parts else None
        if implied:
            implied_by_parent["/".join(parts[:-1])].add(implied)
    result = {}
    for path in paths:
        parts = segments(path)
        tokens: set[str] = set()
        orders: list[int] = []
        for index, segment in enumerate(parts):
            tokens |= segment_tokens(segment)
            rank = ranks.get(("/".join(parts[: index + 1]), index))
            if rank is not None:
                orders.append(rank)
        last = next(iter(segment_tokens(parts[-1])), parts[-1].lower()) if parts else ""
        tokens |= implied_by_parent.get("/".join(parts[:-1]), set())
        result[path] = NameInfo(frozenset(tokens), tuple(orders), last, ".".join(words(path)) if parts else "")
    return result


@functools.lru_cache(maxsize=1 << 16)
def _spelling(a: str, b: str) -> float:
    """Spelling closeness; cached, as the same pairs come back in every pass and block pairing."""
    return SequenceMatcher(None, a, b).ratio()


def similarity(a: NameInfo, b: NameInfo) -> float:
    """0..1: shared role tokens, agreeing sibling order, and spelling closeness."""
    union = a.tokens | b.tokens
    jaccard = len(a.tokens & b.tokens) / len(union) if union else 0.0
    order = 0.0
    if a.orders and b.orders:
        order = 1.0 if a.orders[-1] == b.orders[-1] else -1.0
    spelling = _spelling(a.text, b.text)
    last = 1.0 if a.last == b.last else 0.0
    return max(0.0, min(1.0, 0.45 * jaccard + 0.2 * order + 0.15 * spelling + 0.2 * last + 0.1))
