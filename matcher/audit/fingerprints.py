"""Value fingerprints that survive the op algebra, and fingerprint-filled trees for converters.

Every comparison is bit-exact in the dtype the converted tensor is stored in: a source is
cast to that dtype and both sides are read as unsigned integers of its width ("keys"), so
copies, transposes, reshapes, chunks and concats move keys around without changing them,
and a dtype cast is an explicit step (``cast_note``). The digest of a tensor's sorted keys
is equal for a source and a target exactly when the target holds the same multiset of
values (renames, transposes, reshapes, squeezes); ``matcher.audit.trace`` looks the other
cases up by value (which sources hold a few of the target's values) and confirms every
candidate by running its op chain, never accepting one on a fingerprint alone.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from ..errors import MatcherError
from ..tree import ParamTree, numpy_dtype

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# one value per element, exactly: float32 holds every integer up to 2**24
_EXACT_FLOAT32_INTEGERS = 2**24
_FLOAT32_ONE_BITS = 0x3F800000
_FLOAT32_MAX_BITS = 0x7F7FFFFF


def to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (bfloat16 and float8 through ml_dtypes)."""
    if type(array).__module__.startswith("torch"):
        from ..sources.torch_pickle import to_numpy as torch_to_numpy

        return torch_to_numpy(array)
    return np.asarray(array)


def value_kind(dtype: np.dtype) -> str | None:
    """Values may be compared across dtypes of one kind only: floats with floats, integers with integers."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8")):  # ml_dtypes floats have kind "V"
        return "float"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "b":
        return "bool"
    return None


def keys(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The array cast to ``dtype``, read as unsigned integers of that width (same shape)."""
    dtype = np.dtype(dtype)
    cast = array if array.dtype == dtype else array.astype(dtype)
    return np.ascontiguousarray(cast).view(_UINT[dtype.itemsize])


def digest(key_array: np.ndarray) -> str:
    """Hash of the sorted keys: equal for two arrays holding the same multiset of values."""
    return hashlib.sha1(np.sort(key_array, axis=None).tobytes()).hexdigest()


def cast_note(source: np.ndarray, target_dtype: np.dtype) -> dict | None:
    """How ``source`` became a target of ``target_dtype``: None when no cast; ``lossy`` when
    some of its values do not survive the cast."""
    source_dtype, target_dtype = source.dtype, np.dtype(target_dtype)
    if source_dtype == target_dtype:
        return None
    back = source.astype(target_dtype).astype(source_dtype)
    lossy = not np.array_equal(back, source, equal_nan=value_kind(source_dtype) == "float")
    return {"from": source_dtype.name, "to": target_dtype.name, "lossy": bool(lossy)}


# ---------------------------------------------------------------------- fingerprint-filled trees


def fingerprint_arrays(tree: ParamTree) -> dict[str, np.ndarray]:
    """Arrays with the tree's names and shapes where every element of the whole tree holds a
    different value, so every element of a converter's output says where it came from.

    Floating tensors are float32 (what converters expect of a checkpoint): the integers
    1, 2, 3, ... while the tree has fewer than 2**24 elements, else consecutive float32 bit
    patterns from 1.0 up (still all distinct and finite). Integer tensors count on in int64.
    """
    total = sum(spec.numel for spec in tree.specs.values())
    if total > _FLOAT32_MAX_BITS - _FLOAT32_ONE_BITS:
        raise MatcherError(f"the tree has {total} elements, more than float32 fingerprints can tell apart", path=tree.origin)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for key, spec in tree.specs.items():
        count = math.prod(spec.shape)
        counter = np.arange(offset + 1, offset + count + 1, dtype=np.int64).reshape(spec.shape)
        kind = value_kind(numpy_dtype(spec.dtype))
        if kind == "int":
            arrays[key] = counter
        elif total < _EXACT_FLOAT32_INTEGERS:
            arrays[key] = counter.astype(np.float32)
        else:
            arrays[key] = (counter - 1 + _FLOAT32_ONE_BITS).astype(np.uint32).view(np.float32)
        offset += count
    return arrays
