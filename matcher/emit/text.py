"""Text helpers the emitters share: Python literals, path templates, indentation."""

from __future__ import annotations

import json
import re

PLACEHOLDER = re.compile(r"\{(\w+)\}")
SEPARATORS = "./"  # what ends a path segment in checkpoint keys (torch dots, flax and big_vision slashes)


def python_string(text: str) -> str:
    """``text`` as a double-quoted Python literal."""
    return json.dumps(text)


def raw_string(text: str) -> str:
    """``text`` (a regex) as a raw literal where it can be one."""
    return f'r"{text}"' if '"' not in text and not text.endswith("\\") else python_string(text)


def segment_end(text: str, variable: str) -> int:
    """The end of the path segment holding ``{variable}`` in the template ``text``, its separator included."""
    after = text.index("{" + variable + "}") + len(variable) + 2
    ends = [text.find(sep, after) for sep in SEPARATORS if text.find(sep, after) >= 0]
    return min(ends) + 1 if ends else len(text)


def indented(lines, pad: str) -> list[str]:
    """Lines (some holding several physical lines) shifted right by ``pad``; blank lines stay blank."""
    return [pad + line.replace("\n", "\n" + pad) if line else "" for line in lines]
