"""The one exception type users see: a message naming the thing, what was wrong and a hint."""

from __future__ import annotations


class MatcherError(Exception):
    """A problem with the user's input or request, reported as one line (CLI exit 1)."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.message = message
        self.path = path
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class MappingError(MatcherError):
    """A mapping file or rule is malformed, or does not fit the trees it is applied to."""


class SourceError(MatcherError):
    """A checkpoint cannot be read: wrong format, corrupt, truncated, unsafe."""


class TargetError(MatcherError):
    """The target class or its config cannot be built."""
