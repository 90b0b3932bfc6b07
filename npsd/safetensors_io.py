"""Read `.safetensors` files tensor by tensor with plain file reads.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then N bytes
of JSON header {name: {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}, then the raw little-endian tensor bytes (offsets are relative to the end of the header).

Why not `safetensors.numpy.load_file`: it maps the whole file into memory, and mapped pages count
in the process's resident memory, so loading a 2 GB fp16 file into 4.3 GB of float32 arrays would
peak at about 6.4 GB. Reading each tensor into its own buffer and converting it keeps the peak at the
final float32 weights plus one tensor. numpy also has no bfloat16; bf16 is converted by bit shifting.
The test suite checks this reader against the `safetensors` package on the same files.
"""

import json
import math
import os

import numpy as np

from .ckpt import CkptFile, bf16_to_float32
from .errors import CheckpointError
from .fast import astype

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit; SD v1.5's header is about 150 kB


class TensorInfo:
    def __init__(self, dtype, shape, begin, end):
        self.dtype, self.shape, self.begin, self.end = dtype, tuple(shape), begin, end

    def __repr__(self):
        return f"TensorInfo({self.dtype}, {list(self.shape)})"


class SafetensorsFile:
    """`.tensors` {name: TensorInfo}, `.metadata` {str: str}, `.read(name, dtype)` -> np.ndarray."""

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        self.f = open(self.path, "rb")
        try:
            self._parse_header(size)
        except BaseException:
            self.f.close()  # a refused file is not left open
            raise

    def _parse_header(self, size):
        """Check every header field before anything is read: the file comes from the internet."""
        head = self.f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{self.path} is not a valid .safetensors file (bad header length {n}); "
                                  f"the file is truncated or not a checkpoint")
        try:
            header = json.loads(self.f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: the .safetensors header is not valid JSON ({e}); the file is corrupt") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the .safetensors header is not a JSON object; the file is corrupt")
        self.data_start, data_size = 8 + n, size - 8 - n
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: the .safetensors __metadata__ is not a map of strings; the file is corrupt")
        self.tensors = {}
        for name, h in header.items():
            try:
                dtype, shape, (begin, end) = h["dtype"], h["shape"], h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for {name!r}") from None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype!r:.40}, which npsd cannot read "
                                      f"(supported: {', '.join(DTYPES)})")
            if not isinstance(shape, list) or not all(type(v) is int and v >= 0 for v in shape) \
                    or not all(type(v) is int for v in (begin, end)):  # bool is not a size
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed shape or offsets; corrupt header")
            nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow
            if math.prod(v for v in shape if v) * np.dtype(DTYPES[dtype]).itemsize >= 2**62:  # even if empty:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an absurd shape {shape}; corrupt header")
            if begin < 0 or end - begin != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a byte range that does not fit its shape; corrupt header")
            if end > data_size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data, "
                                      f"but the file holds only {data_size} data bytes; download it again")
            self.tensors[name] = TensorInfo(dtype, shape, begin, end)
        spans = sorted((t.begin, t.end, name) for name, t in self.tensors.items() if t.end > t.begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:  # two tensors would share bytes: a crafted or corrupt header
                raise CheckpointError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file; corrupt header")

    def read(self, name, dtype=None):
        """The tensor `name` as a new array; floating types (incl. bf16) converted to `dtype` if given."""
        t = self.tensors[name]
        raw = np.empty(t.shape, dtype=DTYPES[t.dtype])  # [*shape] as stored
        self.f.seek(self.data_start + t.begin)
        if self.f.readinto(raw.reshape(-1).view(np.uint8)) != t.end - t.begin:  # fills raw in place
            raise CheckpointError(f"{self.path} is truncated while reading {name!r}; download it again")
        if t.dtype == "BF16":
            raw = bf16_to_float32(raw)  # [*shape] uint16 bits -> float32
        if dtype is not None and raw.dtype.kind == "f":
            raw = astype(raw, dtype)  # fp16 -> fp32: exact; in parallel pieces
        return raw

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_safetensors(path):
    """True if the file starts like a .safetensors file (header length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def open_weights(path):
    """A .safetensors or torch zip file -> an object with .tensors {name: info(.shape, .dtype)},
    .read(name, dtype) and .metadata, to be used as a context manager."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; give a .safetensors or .ckpt file or a diffusers folder")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty; download it again")
    if is_safetensors(path):
        return SafetensorsFile(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        ck = CkptFile(path)
        ck.metadata = {}
        return ck
    if path.endswith(".safetensors"):
        raise CheckpointError(f"{path} is not a valid .safetensors file (bad header); the file is truncated or corrupt")
    raise CheckpointError(f"{path} is not a checkpoint npsd can read (expected .safetensors or a torch .ckpt zip)")
