"""Source text of the ops a transformers conversion snippet defines for itself.

transformers' ``core_model_loading`` has Chunk, Split, Concatenate, MergeModulelist and a
Transpose of two axes; matcher's reshapes, squeezes and general permutations have no loading
op there, so the snippet carries these small ``ConversionOps`` subclasses (torch), each with
its inverse where it needs no sizes. ``scoped`` limits transforms to one block, through
transformers' own ``scope_prefix``.
"""


PER_TENSOR = '''\
class PerTensor(ConversionOps):
    """An op on each collected tensor; a lone tensor takes the target's name, as Transpose does."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        if len(input_dict) == 1 and len(target_patterns) == 1:
            input_dict = {target_patterns[0]: next(iter(input_dict.values()))}
        return {
            key: [self.apply(t) for t in value] if isinstance(value, list) else self.apply(value)
            for key, value in input_dict.items()
        }
'''
CUSTOM_OPS = {
    "Permute": '''\
class Permute(PerTensor):
    """Output axis k is input axis dims[k]: flax conv kernels (H, W, in, out) -> torch (out, in, H, W) is 3, 2, 0, 1."""

    def __init__(self, *dims):
        self.dims = dims

    def apply(self, tensor):
        return tensor.permute(*self.dims).contiguous()

    @property
    def reverse_op(self):
        return Permute(*sorted(range(len(self.dims)), key=self.dims.__getitem__))
''',
    "MergeAxes": '''\
class MergeAxes(PerTensor):
    """Merge axes start..end (inclusive) into one: attention kernels (D, H, Dh) -> (D, H*Dh)."""

    def __init__(self, start, end):
        self.start, self.end = start, end

    def apply(self, tensor):
        return tensor.flatten(self.start, self.end)
''',
    "SplitAxis": '''\
class SplitAxis(PerTensor):
    """Split one axis into several: (H*Dh,) -> (H, Dh); one size may be -1."""

    def __init__(self, axis, sizes):
        self.axis, self.sizes = axis, tuple(sizes)

    def apply(self, tensor):
        return tensor.unflatten(self.axis, self.sizes)

    @property
    def reverse_op(self):
        return MergeAxes(self.axis, self.axis + len(self.sizes) - 1)
''',
    "Squeeze": '''\
class Squeeze(PerTensor):
    """Drop an axis of size 1: position embeddings (1, N, D) -> (N, D)."""

    def __init__(self, axis):
        self.axis = axis

    def apply(self, tensor):
        return tensor.squeeze(self.axis)

    @property
    def reverse_op(self):
        return Unsqueeze(self.axis)
''',
    "Unsqueeze": '''\
class Unsqueeze(PerTensor):
    """Insert an axis of size 1 before ``axis``: (N, D) -> (1, N, D)."""

    def __init__(self, axis):
        self.axis = axis

    def apply(self, tensor):
        return tensor.unsqueeze(self.axis)

    @property
    def reverse_op(self):
        return Squeeze(self.axis)
''',
}
CUSTOM_NEEDS = {"SplitAxis": ("MergeAxes",), "Squeeze": ("Unsqueeze",), "Unsqueeze": ("Squeeze",)}

SCOPED = '''\
def scoped(scope, transforms):
    """Limit ``transforms`` to the keys under ``scope.``, as transformers does for a sub-model's mapping."""
    for transform in transforms:
        transform.scope_prefix, transform.base_model_prefix = scope, ""
    return transforms
'''
