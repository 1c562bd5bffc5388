"""Path templates: ``encoder.layers.{i}.mlp.fc1.weight`` with integer placeholders, ``*`` wildcards."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import MappingError

_TOKEN = re.compile(r"\{(\w+)\}|\*")


@dataclass(frozen=True)
class Template:
    text: str

    @functools.cached_property
    def variables(self) -> tuple[str, ...]:
        seen: list[str] = []
        for match in _TOKEN.finditer(self.text):
            name = match.group(1)
            if name and name not in seen:
                seen.append(name)
        return tuple(seen)

    @functools.cached_property
    def regex(self) -> re.Pattern:
        parts, pos, seen = [], 0, set()
        for match in _TOKEN.finditer(self.text):
            parts.append(re.escape(self.text[pos : match.start()]))
            name = match.group(1)
            if name is None:
                parts.append(".*")
            elif name in seen:
                parts.append(f"(?P={name})")
            else:
                parts.append(f"(?P<{name}>\\d+)")
                seen.add(name)
            pos = match.end()
        parts.append(re.escape(self.text[pos:]))
        return re.compile("".join(parts))

    def match(self, path: str) -> dict[str, int] | None:
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {name: int(value) for name, value in found.groupdict().items()}

    def fill(self, bindings: dict[str, int]) -> str:
        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name is None:
                raise MappingError(f"cannot fill wildcard '*' in {self.text!r}")
            if name not in bindings:
                return match.group(0)
            return str(bindings[name])

        return _TOKEN.sub(substitute, self.text)

    @property
    def is_concrete(self) -> bool:
        return _TOKEN.search(self.text) is None


def template(text: str) -> Template:
    return _cached(text)


@functools.lru_cache(maxsize=None)
def _cached(text: str) -> Template:
    return Template(text)
