"""``--emit python``: a standalone converter script, readable like a tidy hand-written one.

``python converter.py SRC OUT_DIR`` writes OUT_DIR/model.safetensors (and config.json when
the config is known) with numpy and safetensors, plus the source format's own loader (torch
with ``weights_only=True``, msgpack); it never imports matcher. Its tensors equal those of
``match SRC --target CLASS --save OUT`` bit for bit.

Layout of the script's ``convert(weights)``: rules templated over a layer index become a loop,
``for i in range(num_layers)``, whose count is read from the checkpoint's keys at run time, with
``src``/``dst`` prefixes naming the block on both sides; every op is a numpy expression
(``numpy_ops``); the parts of one fused tensor (q, k, v) come from one ``np.split``. The
script refuses to write anything when the checkpoint holds a tensor no rule reads and the
mapping does not declare dropped, as ``match`` does.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field

from ..errors import MatcherError
from ..mapping import Rule
from ..ops import Select
from ..patterns import template
from ..tree import ParamTree
from . import Subject, register
from .loaders import format_from_description, loader
from .numpy_ops import combine, render_chain
from .text import PLACEHOLDER, SEPARATORS, indented, python_string, raw_string, segment_end

INDENT = "    "
WRAP_AT = 100  # a list of sources longer than this goes one source per line
# names the script itself uses: a placeholder called so gets a trailing underscore
RESERVED = {"x", "out", "weights", "src", "dst", "parts", "np", "re", "sys", "json", "Path", "key", "num_layers", "save_file"}


# ---------------------------------------------------------------------------- strings


def _name(variable: str) -> str:
    return variable + "_" if variable in RESERVED else variable


def _string(text: str, hole: str | None = None) -> str:
    """``text`` as a Python literal, an f-string where it holds placeholders. The placeholder
    ``hole`` becomes a literal ``{}`` (for count_layers)."""
    pieces: list[tuple[str, str | None]] = []  # (literal, placeholder after it)
    position = 0
    for variable, start, end in _placeholders(text):
        pieces.append((text[position:start], variable))
        position = end
    pieces.append((text[position:], None))
    formatted = any(v is not None and v != hole for _, v in pieces)
    out = []
    for literal, variable in pieces:
        out.append(literal.replace("{", "{{").replace("}", "}}") if formatted else literal)
        if variable == hole and variable is not None:
            out.append("{{}}" if formatted else "{}")
        elif variable is not None:
            out.append("{" + _name(variable) + "}")
    return ("f" if formatted else "") + python_string("".join(out))


def _placeholders(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(1), m.start(), m.end()) for m in PLACEHOLDER.finditer(text)]


# ---------------------------------------------------------------------------- loops


@dataclass(frozen=True)
class Level:
    """One loop: over the instances of ``variable``, counted by ``count`` (after ``setup``)."""

    variable: str
    count: str
    setup: tuple[str, ...] = ()
    prefix: str | None = None  # the source text up to this level's segment, when a source carries it


@dataclass
class Section:
    levels: tuple[Level, ...]
    rules: list[Rule] = field(default_factory=list)


def _levels(rule: Rule) -> tuple[Level, ...]:
    variables = template(rule.target).variables
    if not variables:
        return ()
    carrier = next((s for s in rule.sources if set(variables) <= set(template(s).variables)), None)
    if carrier is None:
        return (_selected_level(rule, variables),)
    levels = []
    for variable in sorted(variables, key=lambda v: carrier.index("{" + v + "}")):
        prefix = carrier[: segment_end(carrier, variable)]
        levels.append(Level(variable, f"count_layers(weights, {_string(prefix, hole=variable)})", prefix=prefix))
    return tuple(levels)


def _selected_level(rule: Rule, variables: tuple[str, ...]) -> Level:
    """A scanned stack ``(L, ...)`` picked per layer: the loop runs over its layer axis."""
    position = next((k for k, op in enumerate(rule.ops) if isinstance(op, Select) and isinstance(op.index, str)), None)
    if position is None or len(variables) != 1 or len(rule.sources) != 1:
        raise MatcherError(f"cannot emit a loop for {rule.target}: its placeholders are bound by no source")
    select = rule.ops[position]
    statements, expr = render_chain(rule.ops[:position], f"weights[{_string(rule.sources[0])}]")
    if statements:
        statements.append(f"x = {expr}")
        expr = "x"
    return Level(variables[0], f"{expr}.shape[{select.axis}]", tuple(statements))


def sections(rules) -> list[Section]:
    """Rules in loops by scope, in order of first appearance; rules outside blocks in runs between."""
    found: list[Section] = []
    by_scope: dict[tuple, Section] = {}
    for rule in rules:
        levels = _levels(rule)
        if not levels:
            if not found or found[-1].levels:
                found.append(Section(()))
            found[-1].rules.append(rule)
            continue
        if levels not in by_scope:
            by_scope[levels] = Section(levels)
            found.append(by_scope[levels])
        by_scope[levels].rules.append(rule)
    return found


# ---------------------------------------------------------------------------- one section


def _common_prefix(texts: list[str], variables: list[str]) -> str | None:
    prefix = os.path.commonprefix(texts)
    cut = max(prefix.rfind(sep) for sep in SEPARATORS) + 1
    prefix = prefix[:cut]
    if not prefix or any("{" + v + "}" not in prefix for v in variables) or any(t == prefix for t in texts):
        return None
    return prefix


@dataclass
class Context:
    """How keys are written inside a section: relative to ``src``/``dst`` where they are defined."""

    src: str | None = None
    dst: str | None = None
    source: ParamTree | None = None

    def key(self, text: str, prefix: str | None, variable: str) -> str:
        if prefix and text.startswith(prefix):
            return f"{variable} + {_string(text[len(prefix):])}"
        return _string(text)

    def source_key(self, text: str) -> str:
        return self.key(text, self.src, "src")

    def target_key(self, text: str) -> str:
        return self.key(text, self.dst, "dst")


def _ndims(rule: Rule, source: ParamTree | None) -> list[int | None]:
    """The rank of each op's input, from one instance of the rule in the checkpoint (if known)."""
    unknown = [None] * len(rule.ops)
    if source is None:
        return unknown
    pattern = template(rule.sources[0])
    key = next((k for k in source.keys() if pattern.match(k) is not None), None)
    if key is None:
        return unknown
    shape = source[key].shape
    binding = {v: 0 for text in (rule.target, *rule.sources) for v in template(text).variables}
    ranks = []
    try:
        for op in rule.ops:
            ranks.append(len(shape))
            op = op.bind(binding)
            shape = op.output_shape([shape, shape]) if op.combines else op.output_shape(shape)
    except MatcherError:
        return unknown
    return ranks


def _sequence(items: list[str], open_: str, close: str) -> str:
    inline = open_ + ", ".join(items) + close
    if len(inline) <= WRAP_AT:
        return inline
    return open_ + "\n" + "".join(f"{INDENT}{item},\n" for item in items) + close


def _source_items(rule: Rule, context: Context) -> list[str]:
    """Each source read as a list item; a gathered one as a starred comprehension over its instances."""
    gathered = set(rule.gathered)
    items = []
    for source in rule.sources:
        here = [v for v in template(source).variables if v in gathered]
        read = f"weights[{context.source_key(source)}]"
        if not here:
            items.append(read)
            continue
        variable = here[0]
        count = f"count_layers(weights, {_string(source[: segment_end(source, variable)], hole=variable)})"
        items.append(f"*[{read} for {_name(variable)} in range({count})]")
    return items


def _combined(rule: Rule, position: int, context: Context, ndims) -> tuple[list[str], str]:
    pre, op = rule.ops[:position], rule.ops[position]
    items = _source_items(rule, context)
    single_gathered = len(items) == 1 and items[0].startswith("*[")
    names = {v: _name(v) for v in rule.source_variables}
    statements, expr = render_chain(pre, "x", ndims[:position], names)
    if not pre:
        listed = items[0][1:] if single_gathered else _sequence(items, "[", "]")
        return [], combine(op, listed)
    iterable = "(" + items[0][2:-1] + ")" if single_gathered else _sequence(items, "(", ")")
    if not statements:
        return [], combine(op, f"[{expr} for x in {iterable}]")
    loop = ["parts = []", f"for x in {iterable}:"] + [INDENT + s for s in statements] + [f"{INDENT}parts.append({expr})"]
    return loop, combine(op, "parts")


def _rule_lines(rule: Rule, context: Context) -> list[str]:
    ndims = _ndims(rule, context.source)
    names = {v: _name(v) for v in (*rule.source_variables, *template(rule.target).variables)}
    position = next((k for k, op in enumerate(rule.ops) if op.combines), None)
    if position is None:
        lines, expr = render_chain(rule.ops, f"weights[{context.source_key(rule.sources[0])}]", ndims, names)
    else:
        lines, combined = _combined(rule, position, context, ndims)
        post, expr = render_chain(rule.ops[position + 1 :], combined, ndims[position + 1 :], names)
        lines += post
    return lines + [f"out[{context.target_key(rule.target)}] = {expr}"]


def _split_key(rule: Rule) -> tuple | None:
    """What the parts of one fused tensor share: its source, the ops before the cut and the cut."""
    position = next((k for k, op in enumerate(rule.ops) if op.name == "chunk"), None)
    if position is None or len(rule.sources) != 1 or rule.gathered or rule.ops[position].parts is None:
        return None
    chunk = rule.ops[position]
    before = json.dumps([op.to_dict() for op in rule.ops[:position]])
    return (rule.sources[0], before, chunk.axis, chunk.parts)


def _split_lines(members: list[Rule], context: Context) -> list[str]:
    first = members[0]
    position = next(k for k, op in enumerate(first.ops) if op.name == "chunk")
    chunk = first.ops[position]
    ndims = _ndims(first, context.source)
    lines, expr = render_chain(first.ops[:position], f"weights[{context.source_key(first.sources[0])}]", ndims[:position])
    axis = "" if chunk.axis == 0 else f", axis={chunk.axis}"
    lines.append(f"parts = np.split({expr}, {chunk.parts}{axis})")
    for rule in members:
        index = rule.ops[position].index
        post, value = render_chain(rule.ops[position + 1 :], f"parts[{index}]", _ndims(rule, context.source)[position + 1 :])
        lines += post + [f"out[{context.target_key(rule.target)}] = {value}"]
    return lines


def _body(rules: list[Rule], context: Context) -> list[str]:
    splits: dict[tuple, list[Rule]] = {}
    for rule in rules:
        key = _split_key(rule)
        if key is not None:
            splits.setdefault(key, []).append(rule)
    lines: list[str] = []
    done: set[tuple] = set()
    for rule in rules:
        key = _split_key(rule)
        if key is not None and len(splits[key]) > 1:
            if key not in done:
                done.add(key)
                lines += _split_lines(splits[key], context)
            continue
        lines += _rule_lines(rule, context)
    return lines


def _section_lines(section: Section, source: ParamTree | None) -> list[str]:
    if not section.levels:
        return _body(section.rules, Context(source=source))
    variables = [level.variable for level in section.levels]
    innermost = section.levels[-1]
    several = len(section.rules) > 1
    src = innermost.prefix if several else None
    dst = _common_prefix([r.target for r in section.rules], variables) if several else None
    lines = [f"# {src or section.rules[0].sources[0]} -> {dst or section.rules[0].target}"]
    depth = 0
    for n, level in enumerate(section.levels):
        pad = INDENT * depth
        lines += indented(level.setup, pad)
        if n == 0:
            lines += [f"{pad}num_layers = {level.count}", f"{pad}for {_name(level.variable)} in range(num_layers):"]
        else:
            lines.append(f"{pad}for {_name(level.variable)} in range({level.count}):")
        depth += 1
    pad = INDENT * depth
    if src:
        lines.append(f"{pad}src = {_string(src)}")
    if dst:
        lines.append(f"{pad}dst = {_string(dst)}")
    return lines + indented(_body(section.rules, Context(src, dst, source)), pad)


# ---------------------------------------------------------------------------- the script

_HELPERS = '''\
class Checkpoint(dict):
    """The checkpoint's tensors by name, remembering which ones were read."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def contiguous(array):
    """safetensors writes an array's memory as it lies: a transposed view is copied into order first."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (ascontiguousarray makes 0-d arrays 1-d)
'''

_COUNT_LAYERS = r'''def count_layers(weights, pattern):
    """How many blocks the checkpoint numbers where ``pattern`` has {}: they must be 0..n-1."""
    before, after = pattern.split("{}")
    number = re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + ("" if after else "$"))
    found = {int(match.group(1)) for key in weights if (match := number.match(key))}
    if not found or found != set(range(len(found))):
        sys.exit(f"error: the checkpoint's blocks {pattern} are not numbered 0..n-1: {sorted(found)}")
    return len(found)
'''

_MAIN = '''\
def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: python {{sys.argv[0]}} SRC OUT_DIR")
    weights = Checkpoint(load_checkpoint(sys.argv[1]))
    out = convert(weights)
    unused = [key for key in weights if key not in weights.read and not any(p.fullmatch(key) for p in DROPPED)]
    if unused:
        sys.exit(f"error: {{len(unused)}} tensor(s) of the checkpoint have no target, nothing written: {{', '.join(unused[:5])}}")
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({{name: contiguous(array) for name, array in out.items()}}, out_dir / "model.safetensors", metadata={{"format": "pt"}})
{write_config}    print(f"wrote {{len(out)}} tensors to {{out_dir}}")


if __name__ == "__main__":
    main()
'''
_WRITE_CONFIG = '''\
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\\n")
'''


def _declared_lines(subject: Subject) -> list[str]:
    lines = ["# tensors of the checkpoint left out on purpose", "DROPPED = ["]
    for declared in subject.mapping.dropped:
        regex = template(declared.pattern).regex.pattern
        literal = raw_string(regex)
        lines += [f"{INDENT}# {line}" for line in textwrap.wrap(declared.why, 96)]
        lines.append(f"{INDENT}re.compile({literal}),  # {declared.pattern}")
    lines.append("]")
    return lines if subject.mapping.dropped else ["DROPPED = []  # the mapping drops no tensor of the checkpoint"]


def _docstring(subject: Subject, fmt: str | None, needs: list[str], with_config: bool) -> str:
    target = subject.target_class or "the target model"
    what = {"npz": "a numpy .npz checkpoint", "torch": "a PyTorch checkpoint", "flax_msgpack": "a flax msgpack checkpoint",
            "safetensors": "a .safetensors checkpoint", "directory": "a save_pretrained directory"}.get(fmt, "a checkpoint")
    lines = [
        f'"""Convert {what} into transformers\' {target}.',
        "",
        f"Made by `match --emit python` from {subject.made_from}.",
        "",
        "    python THIS_SCRIPT SRC OUT_DIR",
        "",
        f"writes OUT_DIR/model.safetensors{' and OUT_DIR/config.json' if with_config else ''}"
        + (f", for {target}.from_pretrained(OUT_DIR)." if subject.target_class else "."),
        f"Needs {', '.join(needs)}.",
    ]
    if subject.mapping.initialised:
        lines += ["", "Left to the model's initialisation (no source): " + ", ".join(
            d.pattern + (f" ({d.why})" if d.why else "") for d in subject.mapping.initialised) + "."]
    if subject.missing:
        lines += ["", f"INCOMPLETE: the mapping leaves {len(subject.missing)} item(s) open; decide them and add the lines:"]
        lines += [f"    {line}" for line in subject.missing]
    return "\n".join(lines) + '\n"""'


def _literal(value, depth: int = 0) -> str:
    """A JSON value as a Python literal, one entry per line where it nests."""
    inner, outer = INDENT * (depth + 1), INDENT * depth
    if isinstance(value, dict) and value:
        entries = [f"{inner}{python_string(key)}: {_literal(item, depth + 1)}," for key, item in value.items()]
        return "{\n" + "\n".join(entries) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + "\n".join(f"{inner}{_literal(item, depth + 1)}," for item in value) + f"\n{outer}]"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item, depth) for item in value) + "]"
    if isinstance(value, str):
        return python_string(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    return repr(value)


@register("python")
def emit_python(subject: Subject) -> str:
    fmt = subject.source_format or format_from_description(subject.mapping.meta.get("source_format"))
    load = loader(fmt, subject.source)
    body_sections = sections(subject.mapping.rules)
    convert_lines: list[str] = []
    for section in body_sections:
        if convert_lines:
            convert_lines.append("")
        convert_lines += _section_lines(section, subject.source)
    uses_count = any("count_layers(" in line for line in convert_lines)
    with_config = subject.config is not None
    needs = ["numpy", "safetensors"] + [m for m in load.imports] + (["ml_dtypes (for bfloat16)"] if "ml_dtypes" in load.code else [])
    parts = [
        "#!/usr/bin/env python3",
        _docstring(subject, fmt, needs, with_config),
        "",
        "import json\nimport re\nimport sys\nfrom pathlib import Path\n\nimport numpy as np\n"
        + ("from safetensors.numpy import load_file, save_file" if "load_file(" in load.code else "from safetensors.numpy import save_file"),
        "",
        "\n".join(_declared_lines(subject)),
        "",
        "",
        load.code.rstrip("\n"),
        "",
        "",
        _HELPERS.rstrip("\n") + ("\n\n\n" + _COUNT_LAYERS.rstrip("\n") if uses_count else ""),
        "",
        "",
        "def convert(weights):",
        f'{INDENT}"""The {subject.target_class or "target"} tensors, by name, from the checkpoint\'s."""',
        f"{INDENT}out = {{}}",
        "\n".join(indented(convert_lines, INDENT)),
        f"{INDENT}return out",
        "",
        "",
        _MAIN.format(write_config=_WRITE_CONFIG if with_config else "").rstrip("\n"),
    ]
    if with_config:
        config = json.loads(subject.config.to_json_string())
        parts[-1:-1] = ["# the target's config.json, as `match --save` writes it", "CONFIG = " + _literal(config), "", ""]
    return "\n".join(parts) + "\n"
