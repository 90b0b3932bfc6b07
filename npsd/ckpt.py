"""Read PyTorch `.ckpt` / `.pt` files without torch and without running anything the file names.

A file written by `torch.save` (PyTorch >= 1.6) is a zip archive:

    <top>/data.pkl        a pickle of the saved object (dicts, tensors, training state)
    <top>/data/<key>      the raw bytes of each storage, little-endian, uncompressed
    <top>/byteorder       "little" (absent in older files, which are little-endian)

(`<top>` is "archive" in recent files and the file's stem in older ones.) A tensor is pickled as a
call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, whose `storage` is a
"persistent id" `("storage", torch.HalfStorage, "<key>", "cpu", numel)`.

Pickle can call any function the file names, which is how a malicious checkpoint runs code. This
module's unpickler resolves names only from a short allow-list, and every allowed name resolves to
npsd's OWN reimplementation (nothing from torch, numpy or the file is ever called):

    torch._utils._rebuild_tensor_v2 / _rebuild_tensor / _rebuild_parameter(_with_state)
                                    -> TensorRef (storage, offset, shape, strides); no bytes read yet
    torch.<X>Storage, torch.UntypedStorage  -> a dtype marker used by the persistent id
    collections.OrderedDict, builtins.set/frozenset   -> the plain containers
    numpy.dtype, numpy.core.multiarray.scalar / _reconstruct, numpy.ndarray
                                    -> numeric numpy values rebuilt from dtype + raw bytes
    _codecs.encode(text, "latin1")  -> text.encode("latin1") (protocol-2 pickles spell bytes this way)
    pytorch_lightning.* / lightning.*  -> inert placeholder classes (training-state callbacks)

Any other global raises CheckpointError naming it, at the moment the pickle names it, i.e. before
any call that would use it could happen.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile

import numpy as np

from .errors import CheckpointError
from .fast import astype

# torch storage class name -> numpy dtype of its elements ("bfloat16": kept as uint16 bits)
STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


def bf16_to_float32(bits):
    """uint16 bfloat16 bit patterns [...] -> float32 [...] (exact: bf16 = the upper 16 bits of fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)  # [...] uint16 -> [...] float32


class StorageRef:
    """A storage named by the pickle: which zip record holds its bytes and how to read them."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class TensorRef:
    """A tensor described by the pickle; `read(archive)` fetches its bytes only when asked."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)

    @property
    def dtype(self):
        return self.storage.dtype

    def __repr__(self):
        return f"TensorRef({self.dtype}, {list(self.shape)})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise CheckpointError("a tensor in the pickle does not refer to a storage record; the file is corrupt")
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # a Parameter is its tensor; gradients and hooks do not matter here


class _StorageType:
    """Stands for `torch.HalfStorage` & co. inside a persistent id; never instantiated."""

    def __init__(self, name):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


# --- numpy values (global_step counters, scores) rebuilt from dtype + raw bytes ------------------

_SAFE_NUMPY_KINDS = "biuf"  # bool, signed/unsigned int, float: no objects, no strings


class _Dtype:
    """What `numpy.dtype(code, align, copy)` + BUILD(state) describe; turned into a real dtype lazily."""

    def __init__(self, code, align=False, copy=False):
        dt = np.dtype(str(code)) if isinstance(code, str) and len(code) <= 4 else None
        if dt is None or dt.kind not in _SAFE_NUMPY_KINDS:
            raise CheckpointError(f"the pickle asks for numpy dtype {code!r}; only numeric dtypes are allowed")
        self.np = dt

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
            self.np = self.np.newbyteorder(state[1]) if state[1] in "<>" else self.np


def _np_scalar(dtype, data=b""):
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes):
        raise CheckpointError("a numpy scalar in the pickle is not a numeric value; the file is corrupt")
    return np.frombuffer(data, dtype=dtype.np, count=1)[0]


class _NdarrayShell:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` + BUILD((1, shape, dtype, fortran, bytes))."""

    def __setstate__(self, state):
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _Dtype) or not isinstance(data, bytes):
            raise CheckpointError("a numpy array in the pickle is not numeric; only numeric arrays are allowed")
        self.value = np.frombuffer(data, dtype=dtype.np).reshape(shape, order="F" if fortran else "C")


def _np_reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise CheckpointError("numpy _reconstruct in the pickle names something other than numpy.ndarray")
    return _NdarrayShell()


_NDARRAY = object()


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise CheckpointError(f"the pickle calls _codecs.encode with {encoding!r}; only latin-1 bytes are allowed")
    return text.encode("latin-1")


class _Inert:
    """An inert stand-in for a training-state class (pytorch_lightning callbacks and the like):
    it records nothing and runs nothing; it only keeps the pickle structurally intact."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric")


class _Allowed:
    """What find_class hands the unpickler: a fresh wrapper around one of npsd's functions. It can be
    called (REDUCE) but refuses BUILD, so a pickle cannot set attributes on npsd's own objects."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise CheckpointError("the pickle tries to set state on a function; the file is not a plain checkpoint")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("numpy", "dtype"): _Dtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("_codecs", "encode"): _codecs_encode,
}
_STORAGES = {("torch", name) for name in STORAGE_DTYPES} | {("torch.storage", "UntypedStorage")}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves globals only through the allow-list above."""

    def find_class(self, module, name):
        if (module, name) in _STORAGES:
            return _StorageType(name)  # a fresh marker per reference: nothing shared between loads
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) in _ALLOWED:
            return _Allowed(_ALLOWED[(module, name)])
        if module.split(".")[0] in _INERT_MODULES:  # a class of its own per file, with no behaviour
            key = f"{module}.{name}"
            if key not in self.inert:
                self.inert[key] = type(f"Inert[{key}]", (_Inert,), {})
            return self.inert[key]
        raise CheckpointError(
            f"refusing to unpickle {self.path}: it names `{module}.{name}`, which a weights file does "
            f"not need (only tensors, storages, plain containers and training counters are allowed); "
            f"nothing from the file was run")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unknown persistent id in the pickle: {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if int(numel) < 0:
            raise CheckpointError(f"{self.path}: a storage in the pickle has a negative size; the file is corrupt")
        return StorageRef(str(key), stype.dtype, int(numel))


def _prescan(data, path):
    """Walk the pickle's opcodes (pickletools, pure Python, runs nothing) before the C unpickler sees
    them: every length must fit in the data (the C unpickler allocates a BYTEARRAY8's claimed size
    before reading it) and every memo index must be below the pickle's size (the C unpickler grows its
    memo array to the index: `LONG_BINPUT 1175087203` would fill 18 GB with zeros). Both are what
    corrupt or crafted files do; torch.save never writes them."""
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= len(data):
                raise ValueError(f"memo index {arg} in a pickle of {len(data)} bytes")
    except Exception as e:  # genops: unknown opcode, truncated argument, bad text, ...
        raise _corrupt_pickle(path, e) from None


def _corrupt_pickle(path, e):
    return CheckpointError(f"{path}: the checkpoint's pickle is corrupt ({type(e).__name__}: {str(e)[:200]})")


def _unwrap(obj):
    """Replace numpy shells by their arrays inside containers (for training state like scores)."""
    if isinstance(obj, _NdarrayShell):
        return getattr(obj, "value", None)
    if isinstance(obj, dict):
        return type(obj)((k, _unwrap(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    return obj


class CkptFile:
    """An opened torch zip checkpoint: `.tensors` {name: TensorRef} and `.read(name)` -> np.ndarray.

    Use as a context manager (it keeps the zip open). Storage bytes are read one storage at a time
    when a tensor is asked for, so memory holds one storage's bytes beside the converted result.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise CheckpointError(_not_zip_message(self.path)) from None
        except Exception as e:  # zipfile meets a damaged directory with assorted errors (ValueError, EOFError, ...)
            raise CheckpointError(f"{self.path}: the zip directory is corrupt ({type(e).__name__}); download it again") from None
        try:
            self._open()
        except BaseException:
            self.zip.close()
            raise

    def _open(self):
        names = self.zip.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{self.path} is a zip file but not a torch checkpoint (no <folder>/data.pkl)")
        self.top = pkls[0][: -len("data.pkl")]
        if self.top + "byteorder" in names and self._record(self.top + "byteorder").strip() != b"little":
            raise CheckpointError(f"{self.path} was saved on a big-endian machine; re-save it on a little-endian one")
        self.obj = self._unpickle(self._record(pkls[0]))
        state = self.obj
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path} holds a {type(state).__name__}, not a state dict of tensors")
        self.tensors = {k: v for k, v in state.items() if isinstance(v, TensorRef)}
        if not all(isinstance(k, str) for k in self.tensors):
            raise CheckpointError(f"{self.path}: the state dict has tensor names that are not strings; the file is corrupt")
        self.other = {k: v for k, v in state.items() if not isinstance(v, TensorRef)}
        self._cache = (None, None)  # the last storage read (tensors that share a storage are adjacent)

    def _unpickle(self, data):
        _prescan(data, self.path)
        unpickler = RestrictedUnpickler(io.BytesIO(data))
        unpickler.path, unpickler.inert = self.path, {}
        try:
            return _unwrap(unpickler.load())
        except CheckpointError:
            raise
        except Exception as e:  # truncated pickle, wrong arguments to our functions, too deep nesting, ...
            raise _corrupt_pickle(self.path, e) from None

    def _record(self, name, what="record"):
        """The bytes of one zip record; a missing or damaged one (bad CRC, bad compression, cut short)
        -> CheckpointError naming it as `what`.

        zipfile inflates a record up to its declared size, so a compressed record declaring far more
        bytes than the whole file holds (a zip bomb; torch.save stores records uncompressed) is refused."""
        try:
            info = self.zip.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > 20 * os.path.getsize(self.path) + 2**20:
                raise CheckpointError(f"{self.path}: record {name} would expand to {info.file_size} bytes, far more "
                                      f"than the file's size; the file is not a plain torch checkpoint")
            return self.zip.read(name)
        except CheckpointError:
            raise
        except KeyError:
            raise CheckpointError(f"{self.path}: {what} {name} is missing; the file is corrupt") from None
        except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError (unknown compression), ...
            raise CheckpointError(f"{self.path}: cannot read {name} ({type(e).__name__}: {e}); "
                                  f"the file is truncated or corrupt") from None

    def _storage(self, ref):
        if self._cache[0] is not ref.key:
            self._cache = (None, None)  # drop the previous storage before reading the next
            name = f"{self.top}data/{ref.key}"
            raw = self._record(name, "storage record")
            dt = np.dtype("uint16" if ref.dtype == "bfloat16" else ref.dtype)
            if len(raw) < ref.numel * dt.itemsize:
                raise CheckpointError(f"{self.path}: storage {name} has {len(raw)} bytes, expected "
                                      f"{ref.numel * dt.itemsize}; the file is truncated or corrupt")
            self._cache = (ref.key, np.frombuffer(raw, dtype=dt, count=ref.numel))
        return self._cache[1]

    def read(self, name, dtype=None):
        """The tensor `name` as a new NumPy array (float types converted to `dtype` when given)."""
        ref = self.tensors[name]
        flat = self._storage(ref.storage)  # [numel] of the storage's dtype
        # a view: element (i, j, ...) sits at offset + i*stride0 + j*stride1 + ... in the storage
        end = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1 if all(ref.shape) else 0
        if ref.offset < 0 or end > flat.size or any(s < 0 for s in ref.stride) or any(n < 0 for n in ref.shape) \
                or len(ref.stride) != len(ref.shape):
            raise CheckpointError(f"{self.path}: tensor {name} reaches outside its storage; the file is corrupt")
        if math.prod(ref.shape) > max(flat.size, 1):  # stride-0 repeats: a crafted file asking for terabytes
            raise CheckpointError(f"{self.path}: tensor {name} {list(ref.shape)} has more elements than its "
                                  f"storage ({flat.size}); the file is corrupt")
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape, strides=[s * flat.itemsize for s in ref.stride], writeable=False)
        if ref.dtype == "bfloat16":
            return astype(bf16_to_float32(view), dtype or np.float32)
        if dtype is not None and view.dtype.kind == "f" and view.dtype != dtype:
            return astype(view, dtype)                             # a new array, in parallel pieces
        return np.array(view)

    def close(self):
        self._cache = (None, None)
        self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _not_zip_message(path):
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return f"{path} is a truncated or corrupt zip/torch checkpoint (its zip directory is unreadable); download it again"
    if head[:1] == b"\x80":
        return (f"{path} is in the legacy (pre-1.6, non-zip) torch format, which npsd cannot "
                f"read without torch; re-save it with torch.save(obj, path, _use_new_zipfile_serialization=True) "
                f"or convert it to .safetensors")
    return f"{path} is not a torch checkpoint (not a zip archive) and not a .safetensors file"
