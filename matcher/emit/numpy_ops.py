"""Each op of ``matcher.ops`` as a plain numpy expression, for emitted converter scripts.

``render(op, expr, ndim, names)`` wraps the expression ``expr`` (a primary: a name, a call, a
subscript) in the op. Reshapes need the sizes of the axes they keep, so they refer to
``expr.shape`` and ``expr`` must then be a bare name; ``render_chain`` assigns intermediate
results to a name where that is needed. ``ndim`` (the input's rank, when the checkpoint is
known) only makes reshapes read better (``x.reshape(x.shape[0], -1)`` rather than
``x.reshape(x.shape[0], -1, *x.shape[3:])``); the result is the same either way.

Every expression computes exactly what ``Op.apply`` computes on a numpy array: the same
values, dtype and shape (views and copies differ only in memory layout, which the script
makes contiguous when it writes).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ..ops import Op

Render = Callable[[Op, str, "int | None", Mapping[str, str]], str]


def _index(axis: int, item: str) -> str:
    """A subscript taking ``item`` on ``axis``: x[i], x[:, i], x[..., i]."""
    if axis >= 0:
        return ", ".join([":"] * axis + [item])
    return ", ".join(["...", item] + [":"] * (-axis - 1))


def _shape_slice(expr: str, start: int, stop: int | None) -> list[str]:
    """The sizes of axes start..stop-1 of ``expr`` as arguments: a few by name, more as a starred slice."""
    if stop is not None and 0 <= start <= stop and stop - start <= 2:
        return [f"{expr}.shape[{k}]" for k in range(start, stop)]
    if stop is not None and stop == start:
        return []
    inner = f"{start if start else ''}:{'' if stop is None else stop}"
    return [f"*{expr}.shape[{inner}]"]


def _around(expr: str, first: int, last: int, ndim: int | None) -> tuple[list[str], list[str]]:
    """The size arguments before axis ``first`` and after axis ``last`` (both may be negative)."""
    if ndim is not None:
        first, last = first % ndim, last % ndim
    lead = _shape_slice(expr, 0, first) if first >= 0 else [f"*{expr}.shape[:{first}]"]
    if ndim is not None:
        tail = _shape_slice(expr, last + 1, ndim) if last + 1 < ndim else []
    elif last == -1:
        tail = []
    else:
        tail = [f"*{expr}.shape[{last + 1}:]"]
    return lead, tail


def _transpose(op, expr, ndim, names):
    if list(op.perm) == [1, 0]:
        return f"{expr}.T"
    return f"{expr}.transpose({', '.join(map(str, op.perm))})"


def _merge_axes(op, expr, ndim, names):
    lead, tail = _around(expr, op.start, op.end, ndim)
    return f"{expr}.reshape({', '.join(lead + ['-1'] + tail)})"


def _split_axis(op, expr, ndim, names):
    lead, tail = _around(expr, op.axis, op.axis, ndim)
    return f"{expr}.reshape({', '.join(lead + [str(s) for s in op.sizes] + tail)})"


def _squeeze(op, expr, ndim, names):
    return f"{expr}.squeeze({op.axis})"


def _unsqueeze(op, expr, ndim, names):
    return f"np.expand_dims({expr}, {op.axis})"


def _chunk(op, expr, ndim, names):
    if op.parts is not None:
        axis = "" if op.axis == 0 else f", axis={op.axis}"
        return f"np.split({expr}, {op.parts}{axis})[{op.index}]"
    start = sum(op.sizes[: op.index])
    return f"{expr}[{_index(op.axis, f'{start}:{start + op.sizes[op.index]}')}]"


def _select(op, expr, ndim, names):
    index = op.index if isinstance(op.index, int) else names[op.index[1:-1]]
    return f"{expr}[{_index(op.axis, str(index))}]"


RENDER: dict[str, Render] = {
    "transpose": _transpose,
    "merge_axes": _merge_axes,
    "split_axis": _split_axis,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "chunk": _chunk,
    "select": _select,
}
COMBINE = {"concat": "np.concatenate", "stack": "np.stack"}


def render(op: Op, expr: str, ndim: int | None = None, names: Mapping[str, str] | None = None) -> str:
    if op.name not in RENDER:
        raise ValueError(f"no numpy rendering for op {op.name!r}")
    return RENDER[op.name](op, expr, ndim, names or {})


def render_chain(
    ops: Sequence[Op], first: str, ndims: Sequence[int | None] | None = None, names: Mapping[str, str] | None = None, var: str = "x"
) -> tuple[list[str], str]:
    """Statements (each assigning ``var``) and the expression that apply unary ``ops`` to ``first``."""
    ndims = list(ndims) if ndims is not None else [None] * len(ops)
    statements: list[str] = []
    expr = first
    for op, ndim in zip(ops, ndims):
        if expr != var and f"{var}.shape" in render(op, var, ndim, names):
            statements.append(f"{var} = {expr}")
            expr = var
        expr = render(op, expr, ndim, names)
    return statements, expr


def combine(op: Op, items: str) -> str:
    """The combining op over the list expression ``items``."""
    return f"{COMBINE[op.name]}({items}, axis={op.axis})"
