"""Checkpoint loaders for emitted converter scripts, one per source format, as source text.

Each gives the tensors under the names matcher's own reader gives them (``matcher/sources``):
'/'-joined flax keys, torch state dicts unwrapped from their containers with a DDP
``module.`` prefix stripped, bfloat16 kept bit for bit (through ml_dtypes, imported only when
the checkpoint holds bfloat16). A report's source tree says which format and what was
unwrapped, so the script does just that; a plain mapping gets the generic version.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sources.torch_pickle import CONTAINERS
from ..tree import ParamTree


@dataclass(frozen=True)
class Loader:
    imports: tuple[str, ...]  # third-party modules the script imports at the top
    code: str  # defines load_checkpoint(path) -> {name: numpy array}


# ---------------------------------------------------------------------------- pieces

_NPZ = '''\
def {name}(path):
    """A numpy .npz archive (big_vision): one array per key."""
    with np.load(path, allow_pickle=False) as archive:
        return {{key: {array} for key in archive.files}}
'''
_NPZ_BFLOAT16 = '''\


def as_bfloat16(array):
    """numpy writes bfloat16 as raw 2-byte values ('|V2'); give them their type back."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array
'''

_TORCH = '''\
def {name}(path):
    """A PyTorch checkpoint, loaded with weights_only=True: nothing in the file runs."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
{unwrap}    tensors = flatten_state_dict(checkpoint)
{strip}    return {{key: {to_numpy} for key, tensor in tensors.items()}}


def flatten_state_dict(tree, prefix=""):
    """{{"a": {{"b": tensor}}}} -> {{"a.b": tensor}}; entries that are not tensors are left out."""
    import torch

    flat = {{}}
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        name = f"{{prefix}}.{{key}}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, (dict, list, tuple)):
            flat.update(flatten_state_dict(value, name))
    return flat
'''
_TORCH_UNWRAP_ANY = f'''\
    while isinstance(checkpoint, dict):  # the weights may sit under {{"state_dict": ...}} and the like
        inner = next((checkpoint[c] for c in {CONTAINERS!r} if isinstance(checkpoint.get(c), dict) and checkpoint[c]), None)
        if inner is None:
            break
        checkpoint = inner
'''
_TORCH_STRIP_ANY = '''\
    if tensors and all(key.startswith("module.") for key in tensors):  # saved from DistributedDataParallel
        tensors = {key.removeprefix("module."): tensor for key, tensor in tensors.items()}
'''
_TORCH_STRIP = '''\
    tensors = {key.removeprefix("module."): tensor for key, tensor in tensors.items()}  # saved from DistributedDataParallel
'''
_TORCH_BFLOAT16 = '''\


def to_numpy(tensor):
    """numpy has no bfloat16: keep the bits, typed by ml_dtypes."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
'''

_FLAX = '''\
def {name}(path):
    """A flax msgpack checkpoint (flax.serialization.to_bytes): nested dicts of arrays."""
    import msgpack

    def ext_hook(code, data):
        if code in (1, 3):  # flax's ndarray and numpy scalar types: (shape, dtype name, C-order bytes)
            shape, dtype, buffer = msgpack.unpackb(data)
            return np.frombuffer(buffer, dtype={dtype}).reshape(shape)
        return msgpack.ExtType(code, data)

    tree = msgpack.unpackb(Path(path).read_bytes(), ext_hook=ext_hook, raw=False, strict_map_key=False)
    return flatten_params(tree)


def flatten_params(tree, prefix=""):
    """{{"a": {{"b": array}}}} -> {{"a/b": array}}; entries that are not arrays are left out."""
    flat = {{}}
    for key, value in tree.items():
        name = f"{{prefix}}/{{key}}" if prefix else str(key)
        if isinstance(value, dict) and "__msgpack_chunked_array__" in value:  # flax cuts huge arrays in chunks
            chunks = [value["chunks"][str(n)] for n in range(len(value["chunks"]))]
            shape = [value["shape"][str(n)] for n in range(len(value["shape"]))]
            flat[name] = np.concatenate([chunk.ravel() for chunk in chunks]).reshape(shape)
        elif isinstance(value, dict):
            flat.update(flatten_params(value, name))
        elif isinstance(value, np.ndarray):
            flat[name] = value
    return flat
'''
_FLAX_BFLOAT16 = '''\


def numpy_dtype(name):
    """numpy's dtype of that name, or ml_dtypes' (bfloat16 and the float8 types)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
'''

_SAFETENSORS = '''\
def {name}(path):
    """A .safetensors file."""
    return load_file(path)
'''

_DIRECTORY = '''\
def {name}(path):
    """A save_pretrained directory: model.safetensors, or the shards its index lists."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {{}}
    for shard in shards:
        weights.update(load_file(path / shard))
    return weights
'''

_ANY = '''\
def load_checkpoint(path):
    """Any checkpoint format matcher reads, told apart by its first bytes, not its name."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").exists() and (path / "pytorch_model.bin").exists():
            return load_torch(path / "pytorch_model.bin")
        return load_directory(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK"):  # a zip: numpy's .npz, or torch's own format (it holds data.pkl)
        import zipfile

        with zipfile.ZipFile(path) as archive:
            is_torch = any(name.endswith("data.pkl") for name in archive.namelist())
        return load_torch(path) if is_torch else load_npz(path)
    if head[:1] == b"\\x80" and head[1:2] in (b"\\x02", b"\\x03", b"\\x04", b"\\x05"):  # a pickle: legacy torch
        return load_torch(path)
    if 0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map: flax
        return load_flax(path)
    return load_safetensors(path)
'''


# ---------------------------------------------------------------------------- composition


def _torch(name: str, source: ParamTree | None, bfloat16: bool) -> str:
    if source is None:
        unwrap, strip = _TORCH_UNWRAP_ANY, _TORCH_STRIP_ANY
    else:
        unwrap = "".join(
            f"    checkpoint = checkpoint[{container!r}]  # the weights sit under {container!r}\n".replace("'", '"')
            for container in source.info.get("unwrapped", [])
        )
        strip = _TORCH_STRIP if source.info.get("stripped_prefix") else ""
    text = _TORCH.format(name=name, unwrap=unwrap, strip=strip, to_numpy="to_numpy(tensor)" if bfloat16 else "tensor.detach().numpy()")
    return text + (_TORCH_BFLOAT16 if bfloat16 else "")


def _npz(name: str, bfloat16: bool) -> str:
    text = _NPZ.format(name=name, array="as_bfloat16(archive[key])" if bfloat16 else "archive[key]")
    return text + (_NPZ_BFLOAT16 if bfloat16 else "")


def _flax(name: str, bfloat16: bool) -> str:
    text = _FLAX.format(name=name, dtype="numpy_dtype(dtype)" if bfloat16 else "np.dtype(dtype)")
    return text + (_FLAX_BFLOAT16 if bfloat16 else "")


FORMATS = ("npz", "torch", "flax_msgpack", "safetensors", "directory")
# words of a mapping's free-text source_format, checked in order, and the reader they mean
_FORMAT_WORDS = (("npz", "npz"), ("msgpack", "flax_msgpack"), ("safetensors", "safetensors"), ("torch", "torch"), (".pt", "torch"))


def format_from_description(text: str | None) -> str | None:
    """The reader a mapping's ``source_format`` text names (``big_vision npz`` -> npz), if any."""
    lowered = (text or "").lower()
    return next((fmt for word, fmt in _FORMAT_WORDS if word in lowered), None)


def loader(fmt: str | None, source: ParamTree | None) -> Loader:
    """The loader for checkpoints of ``fmt`` (None: any format, chosen at run time)."""
    bfloat16 = source is None or any(spec.dtype == "bfloat16" for spec in source.specs.values())
    if fmt == "npz":
        return Loader((), _npz("load_checkpoint", bfloat16))
    if fmt == "torch":
        return Loader(("torch",), _torch("load_checkpoint", source, bfloat16))
    if fmt == "flax_msgpack":
        return Loader(("msgpack",), _flax("load_checkpoint", bfloat16))
    if fmt == "safetensors":
        return Loader((), _SAFETENSORS.format(name="load_checkpoint"))
    if fmt == "directory" and all(str(s).endswith(".safetensors") for s in (source.info.get("shards", []) if source else [])):
        return Loader((), _DIRECTORY.format(name="load_checkpoint"))
    parts = [
        _ANY,
        _DIRECTORY.format(name="load_directory"),
        _npz("load_npz", True),
        _torch("load_torch", None, True),
        _flax("load_flax", True),
        _SAFETENSORS.format(name="load_safetensors"),
    ]
    return Loader(("torch", "msgpack"), "\n\n".join(parts))
