"""Reading released PyTorch checkpoints without PyTorch and without running their pickles.

A checkpoint is untrusted input: a ``.pth`` file is a pickle, and a plain unpickle runs
whatever the file tells it to (``os.system``, ``exec``, any importable function). kfundus
reads checkpoints itself, with the Python standard library and NumPy only:

- **the torch zip format** (what ``torch.save`` writes since PyTorch 1.6): a zip archive
  holding ``<archive>/data.pkl`` (the object tree) and one raw buffer per storage
  (``<archive>/data/<key>``). ``data.pkl`` is read by a restricted :class:`pickle.Unpickler`
  whose ``find_class`` resolves only the handful of globals a tensor state dict needs
  (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
  ``_rebuild_parameter``, the ``torch.*Storage`` types), each to a small function of this
  module that builds a NumPy array from the raw buffer, never to the real torch object.
  A few metadata types training scripts leave beside the weights (``argparse.Namespace``,
  NumPy scalars and arrays) become inert :class:`Opaque` records (nothing is called).
  Any other global is refused with a :class:`kfundus.errors.DataError` naming the file
  and the global, before anything is built; the payload never runs;
- **safetensors** (``.safetensors``): the 8-byte header length, the JSON header and the
  raw little-endian buffers, parsed here;
- **the Hugging Face layout**: a folder with ``model.safetensors`` or
  ``pytorch_model.bin`` (or their sharded ``*.index.json`` forms, or open_clip's
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``), plus an optional
  ``config.json``, which is returned alongside.

Wrapped dicts are unwrapped (``{"model": sd}``, ``{"state_dict": sd}``,
``{"model_state_dict": sd}``, ``{"teacher": sd}``, ...), and a ``module.`` prefix
(``DataParallel``) or ``_orig_mod.`` prefix (``torch.compile``) on every key is stripped.
Tensors come back as NumPy arrays: float32, float16 and the integer types as they are,
bfloat16 widened to float32 (exactly: a bfloat16 is the top half of a float32). Stored
(uncompressed) zip entries are memory-mapped, so reading a 1.2 GB ViT-L file does not
copy it.

Errors (DataError, naming the file and the model it was asked to be): a missing file, a
truncated or non-checkpoint file, a pickled object that is not a state dict, a refused
global, an empty state dict.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from kfundus.errors import DataError

# torch storage type name -> NumPy dtype of its elements ("bfloat16": stored as uint16, widened).
STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# safetensors dtype tag -> NumPy dtype.
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
NUMPY_DTYPES = {v: v for v in STORAGE_DTYPES.values() if v != "bfloat16"}
# Keys a training script wraps a state dict in, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module", "teacher", "student", "network", "net", "params")
# Prefixes on every key that say how the model was wrapped when it was saved.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Files of a Hugging Face model folder, in order of preference.
HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a pre-1.6 torch.save pickle


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read from disk.

    Attributes:
        path: the file or folder it was read from.
        state: the state dict, ``{key: numpy array}`` (wrapper removed, prefixes stripped).
        format: ``torch-zip``, ``safetensors`` or ``huggingface`` (a folder).
        files: the files the tensors came from (one, or a folder's shards).
        wrapper: the key the state dict was wrapped in (``model``, ``state_dict``, ...), or None.
        stripped_prefix: the prefix removed from every key (``module.``), or None.
        extra: the other top-level entries of a wrapped checkpoint (``optimizer``, ``epoch``,
            ``args``), by name, with a short description each; they are not used.
        config: a Hugging Face folder's ``config.json``, or None.
        dtypes: how many tensors had each stored dtype (``{"float16": 12, ...}``).
    """

    path: Path
    state: dict
    format: str
    files: list = dataclasses.field(default_factory=list)
    wrapper: str | None = None
    stripped_prefix: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    config: dict | None = None
    dtypes: dict = dataclasses.field(default_factory=dict)

    def sha256(self) -> str:
        """SHA-256 of the checkpoint file (of every shard, in order, for a folder)."""
        digest = hashlib.sha256()
        for file in self.files:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()


@dataclasses.dataclass
class Opaque:
    """Metadata a checkpoint carries beside its tensors (``argparse.Namespace``, a NumPy
    scalar or array), kept as inert data: the name of the global and what the pickle
    passed to it. Nothing is called or imported."""

    name: str
    args: tuple = ()
    state: object = None

    def __setstate__(self, state):  # BUILD on an opaque record: keep the data, run nothing
        self.state = state


def _opaque(name: str):
    def make(*args):
        return Opaque(name, args)

    make.__name__ = name
    return make


def _opaque_class(name: str):
    """Stand-in for a class pickled with NEWOBJ (``argparse.Namespace``): ``cls.__new__``
    (and ``cls(...)``) return an :class:`Opaque` record."""

    class Record:
        def __new__(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args)
            return Opaque(name, args)

    Record.__name__ = name.rsplit(".", 1)[-1]
    return Record


def _storage_type(name: str):
    """A marker the persistent id of a storage names (``torch.FloatStorage``)."""
    return ("storage_type", STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *args):
    """``torch._utils._rebuild_tensor_v2`` as NumPy: a view of the storage buffer with the
    tensor's offset, shape and strides (in elements), copied only when not contiguous."""
    array, dtype = storage
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    count = int(np.prod(size)) if size else 1
    if count == 0:
        return _widen(np.zeros(size, dtype=array.dtype), dtype)
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if stride == contiguous or count == 1:
        out = array[offset : offset + count].reshape(size)
    else:
        if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(array):
            raise ValueError("a tensor reaches past the end of its storage")
        item = array.itemsize
        out = np.lib.stride_tricks.as_strided(
            array[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
        ).copy()
    if out.size != count:
        raise ValueError("a tensor reaches past the end of its storage")
    return _widen(out, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """``torch._utils._rebuild_parameter(_with_state)``: the parameter's data."""
    return data


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """bfloat16 (read as uint16) -> float32, exactly; other dtypes as they are."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


# The globals a state dict (and the metadata beside it) may name, and what each becomes.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _storage_type(name) for name in STORAGE_DTYPES},
}
OPAQUE_GLOBALS = {
    ("argparse", "Namespace"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
    ("torch", "device"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class StateDictUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that builds tensors as NumPy arrays from the archive's
    storages and refuses every global outside :data:`SAFE_GLOBALS` / :data:`OPAQUE_GLOBALS`.

    Args:
        file: the pickle stream (``data.pkl``).
        load_storage: ``(key, dtype) -> 1-D numpy array`` of a storage's elements.
    """

    def __init__(self, file, load_storage):
        super().__init__(file)
        self.load_storage = load_storage
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if (module, name) in OPAQUE_GLOBALS:
            if name[:1].isupper():  # a class: NEWOBJ calls cls.__new__(cls, ...)
                return _opaque_class(f"{module}.{name}")
            return _opaque(f"{module}.{name}")
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        marker, key = pid[1], str(pid[2])
        if not (isinstance(marker, tuple) and marker[:1] == ("storage_type",)):
            raise pickle.UnpicklingError(f"storage {key} has an unknown type {marker!r}")
        dtype = marker[1]
        if key not in self.storages:
            self.storages[key] = (self.load_storage(key, dtype, int(pid[4])), dtype)
        return self.storages[key]


# ---------------------------------------------------------------------------
# formats


def _fail(path, model: str, problem: str, fix: str = "") -> DataError:
    what = f" (asked to read it as {model})" if model else ""
    return DataError(f"{path}: {problem}{what}" + (f"; {fix}" if fix else ""))


def _zip_member_array(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, mapped, dtype: str):
    """The raw elements of one zip member: a zero-copy view of the memory-mapped file when
    the member is stored uncompressed (torch.save's case), else read and decompressed."""
    np_dtype = np.dtype("uint16" if dtype == "bfloat16" else NUMPY_DTYPES[dtype]).newbyteorder("<")
    if info.compress_type == zipfile.ZIP_STORED and mapped is not None:
        header = mapped[info.header_offset : info.header_offset + 30]
        if len(header) < 30 or header[:4] != ZIP_MAGIC:
            raise ValueError(f"damaged zip entry {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if start + info.file_size > len(mapped):
            raise ValueError(f"{info.filename} is cut short")
        buffer = memoryview(mapped)[start : start + info.file_size]
    else:
        buffer = archive.read(info)
    if len(buffer) % np_dtype.itemsize:
        raise ValueError(f"{info.filename}: {len(buffer)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(buffer, dtype=np_dtype)


def read_torch_zip(path: Path, model: str = "") -> object:
    """The object a ``torch.save`` zip file holds, tensors as NumPy arrays, read with the
    restricted unpickler (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _fail(
            path, model, f"is truncated or not a PyTorch checkpoint ({exc})", "download the file again"
        ) from exc
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise _fail(
                path,
                model,
                "is a zip archive but not a PyTorch checkpoint (no <archive>/data.pkl inside)",
                "give the .pth/.bin file torch.save wrote",
            )
        root = pickles[0].rsplit("/", 1)[0]
        byteorder = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
        if byteorder != "little":
            raise _fail(path, model, f"was written on a {byteorder}-endian machine, which kfundus does not read")
        infos = {i.filename: i for i in archive.infolist()}
        with open(path, "rb") as handle:
            try:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):  # an empty file cannot be mapped
                mapped = None

        def load_storage(key, dtype, numel):
            info = infos.get(f"{root}/data/{key}")
            if info is None:
                raise ValueError(f"storage {key} is missing from the archive")
            array = _zip_member_array(path, archive, info, mapped, dtype)
            if len(array) < numel:
                raise ValueError(f"storage {key} holds {len(array)} values, the pickle expects {numel}")
            return array

        try:
            return StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()
        except RefusedGlobal as exc:
            raise _fail(
                path,
                model,
                f"refused to load: its pickle names the global {exc.module}.{exc.name}, which a weights "
                "file has no reason to contain (only tensors, storages and plain containers are read; "
                "nothing in the file was run)",
                "use a checkpoint that holds a state dict (torch.save(model.state_dict(), ...)), or "
                "convert it to .safetensors where it was made",
            ) from None
        except (pickle.UnpicklingError, ValueError, EOFError, KeyError, zipfile.BadZipFile, OSError) as exc:
            raise _fail(
                path, model, f"is damaged or truncated ({exc.__class__.__name__}: {exc})", "download it again"
            ) from exc


def read_safetensors(path: Path, model: str = "") -> dict:
    """``{name: array}`` of a ``.safetensors`` file (header and buffers parsed here)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > 100_000_000:
                raise ValueError(f"its header claims {length} bytes, the file has {size - 8} after the length")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _fail(path, model, f"is truncated or not a safetensors file ({exc})", "download it again") from exc
    start = 8 + length
    state = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(path, model, f"has a malformed header entry for {name!r} ({exc})") from exc
        np_dtype = np.dtype("uint16" if dtype == "bfloat16" else dtype).newbyteorder("<")
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np_dtype.itemsize or start + end > len(mapped) or begin < 0:
            raise _fail(
                path,
                model,
                f"is truncated or damaged: tensor {name!r} {list(shape)} needs bytes {begin}..{end} of a "
                f"{len(mapped) - start}-byte buffer",
                "download it again",
            )
        array = np.frombuffer(memoryview(mapped)[start + begin : start + end], dtype=np_dtype).reshape(shape)
        state[name] = _widen(array, dtype)
    return state


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {list(value.shape)} {value.dtype}"
    if isinstance(value, Opaque):
        return f"{value.name} (metadata, not read)"
    if isinstance(value, dict):
        return f"dict of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__ + (f" {value}" if isinstance(value, (int, float, str)) else "")


def _is_state_dict(value) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    arrays = [v for v in value.values() if isinstance(v, np.ndarray)]
    return len(arrays) >= max(1, len(value) // 2) and all(isinstance(k, str) for k in value)


def unwrap(obj, path: Path, model: str = "") -> tuple[dict, str | None, dict]:
    """``(state dict, wrapper key or None, {other top-level key: description})``."""
    if not isinstance(obj, dict):
        raise _fail(
            path,
            model,
            f"holds a {_describe(obj)}, not a state dict (a mapping of parameter names to tensors)",
            "save model.state_dict() instead of the model object",
        )
    if _is_state_dict(obj):
        extra = {k: _describe(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
        return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}, None, extra
    for key in WRAPPER_KEYS:
        if _is_state_dict(obj.get(key)):
            inner = obj[key]
            extra = {str(k): _describe(v) for k, v in obj.items() if k != key}
            extra.update({f"{key}.{k}": _describe(v) for k, v in inner.items() if not isinstance(v, np.ndarray)})
            return {k: v for k, v in inner.items() if isinstance(v, np.ndarray)}, key, extra
    if not obj or all(isinstance(v, dict) and not v for v in obj.values()):
        raise _fail(path, model, "holds an empty state dict (no tensors at all)", "check that the right file was saved")
    contents = ", ".join(f"{k}: {_describe(v)}" for k, v in list(obj.items())[:8])
    raise _fail(
        path,
        model,
        f"holds no state dict: its top-level entries are {{{contents}}}, and none of "
        f"{list(WRAPPER_KEYS)} is a mapping of names to tensors",
        "save model.state_dict(), or a dict with it under 'model' or 'state_dict'",
    )


def strip_prefix(state: dict) -> tuple[dict, str | None]:
    """Remove a ``module.`` / ``_orig_mod.`` prefix every key carries (repeatedly)."""
    stripped = None
    for _ in range(3):
        for prefix in STRIPPED_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = (stripped or "") + prefix
                break
        else:
            break
    return state, stripped


def _read_file(path: Path, model: str) -> tuple[object, str]:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise _fail(path, model, "is empty (0 bytes)", "download it again")
    if head[:4] == ZIP_MAGIC:
        return read_torch_zip(path, model), "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return read_safetensors(path, model), "safetensors"
    if head[:1] == b"\x80":  # a bare pickle: a pre-1.6 torch.save, or a plain pickle of anything
        # the legacy format starts with the magic number as a protocol-2 LONG1: 80 02 8a 0a + 10 bytes
        if head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == LEGACY_MAGIC:
            raise _fail(
                path,
                model,
                "was written by PyTorch older than 1.6 (the legacy, non-zip format), which kfundus does not read",
                "re-save it with a current PyTorch (torch.save(torch.load(f, weights_only=True), f2)) or as "
                ".safetensors",
            )
        raise _fail(
            path,
            model,
            "is a bare pickle, not a PyTorch checkpoint; kfundus never unpickles such files",
            "give the .pth/.bin file torch.save wrote, or a .safetensors file",
        )
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        raise _fail(path, model, "is an HDF5 (Keras) file, not a PyTorch checkpoint")
    raise _fail(
        path,
        model,
        "is not a PyTorch checkpoint or safetensors file (unknown format, or truncated)",
        "give the .pth/.bin/.safetensors file the model was released as",
    )


def _read_folder(path: Path, model: str) -> tuple[dict, list[Path], dict | None]:
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise _fail(path / "config.json", model, f"is not valid JSON ({exc})") from exc
    for name in HF_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise _fail(file, model, f"is not a shard index (no weight_map: {exc})") from exc
            shards = [path / s for s in dict.fromkeys(index.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise _fail(file, model, f"names shard(s) {missing} that are not in {path}")
        else:
            shards = [file]
        objects = []
        for shard in shards:
            obj, _ = _read_file(shard, model)
            objects.append(unwrap(obj, shard, model)[0])
        state = {k: v for part in objects for k, v in part.items()}
        return state, shards, config
    present = sorted(p.name for p in path.iterdir())[:12]
    raise _fail(
        path,
        model,
        f"is a folder without model weights (looked for {', '.join(HF_FILES)}; it has {present})",
        "give the checkpoint file itself, or the Hugging Face model folder",
    )


def read_checkpoint(path, *, model: str = "") -> Checkpoint:
    """Read a checkpoint file or Hugging Face folder into a :class:`Checkpoint`.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` file (torch zip format), a ``.safetensors`` file, or
            a Hugging Face model folder.
        model: what the caller means to read it as (``"RETFound"``), for error messages.

    Returns:
        The state dict (NumPy arrays, wrapper removed, ``module.`` stripped) and what was
        found around it.

    Raises:
        DataError: a missing file, a truncated or non-checkpoint file, a refused pickle
            global, a pickle of something other than a state dict, an empty state dict.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise _fail(path, model, "no such file or folder", "check the path (a released .pth/.safetensors file)")
    if path.is_dir():
        state, files, config = _read_folder(path, model)
        fmt, wrapper, extra = "huggingface", None, {}
    else:
        obj, fmt = _read_file(path, model)
        state, wrapper, extra = unwrap(obj, path, model)
        files, config = [path], None
    state, stripped = strip_prefix(state)
    if not state:
        raise _fail(path, model, "holds an empty state dict (no tensors at all)", "check that the right file was saved")
    dtypes = collections.Counter(str(v.dtype) for v in state.values())
    return Checkpoint(
        path=path,
        state=state,
        format=fmt,
        files=files,
        wrapper=wrapper,
        stripped_prefix=stripped,
        extra=extra,
        config=config,
        dtypes=dict(dtypes),
    )


def read_state_dict(path, *, model: str = "") -> dict:
    """``{parameter name: numpy array}`` of a checkpoint (a torch-zip ``.pth``/``.bin``, a
    ``.safetensors`` file or a Hugging Face folder), read as :func:`read_checkpoint` reads
    it (same errors); ``model`` names what the caller means to read it as."""
    return read_checkpoint(path, model=model).state


def as_float32(array: np.ndarray) -> np.ndarray:
    """A float32 copy-free view where possible (float16/float64 arrays are converted)."""
    return array if array.dtype == np.float32 else array.astype(np.float32)
