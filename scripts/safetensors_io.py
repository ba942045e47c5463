"""safetensors_io.py: read and write safetensors checkpoints with numpy only (no safetensors package).

Format (little-endian): uint64 N, then N bytes of JSON mapping each tensor name to
{"dtype": "F32"|"F16"|"BF16"|..., "shape": [...], "data_offsets": [begin, end]} (offsets relative to the
byte buffer that follows the JSON; an optional "__metadata__" entry maps strings to strings), then the
raw tensor bytes, row-major.

Reading is lazy: each file is memory-mapped and a tensor is a view into the map until converted, so a
70B checkpoint streams tensor by tensor. A sharded checkpoint is a directory with
model.safetensors.index.json ({"weight_map": {name: shard file}}); `Checkpoint(dir)` hides the shards.

bf16 has no numpy dtype: raw bf16 data is handled as uint16 bit patterns (the top half of an fp32).
"""
import json
import mmap
import os

import numpy as np

# dtypes we read (numpy storage type; BF16 is stored as its uint16 bits).
_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class SafetensorsError(Exception):
    """A malformed or unsupported safetensors file; the message is one line meant for the user."""


def bf16_bits_to_f32(bits):
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """float32 -> uint16 bf16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if is_nan.any():
        rounded = np.where(is_nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)
    return rounded


def to_f32(raw, dtype):
    """A raw tensor (as returned by SafetensorsFile.raw) -> float32 array."""
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    return np.asarray(raw, dtype=np.float32)


class SafetensorsFile:
    """One .safetensors file, memory-mapped. `.tensors`: name -> {"dtype", "shape", "data_offsets"}."""

    def __init__(self, path):
        self.path = path
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise SafetensorsError(f"cannot open '{path}' ({e.strerror})")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"'{path}' is too small to be a safetensors file")
        n = int.from_bytes(self._fh.read(8), "little")
        if n > size - 8 or n > (1 << 30):
            raise SafetensorsError(f"'{path}': header length {n} exceeds the file size")
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"'{path}': header is not valid JSON ({e})")
        if not isinstance(header, dict):
            raise SafetensorsError(f"'{path}': header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors = header
        self._data_start = 8 + n
        data_len = size - self._data_start
        for name, info in self.tensors.items():
            try:
                dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"'{path}': malformed entry for tensor '{name}'")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if dtype in _ITEMSIZE and e - b != count * _ITEMSIZE[dtype]:
                raise SafetensorsError(f"'{path}': tensor '{name}' has {e - b} bytes, its shape {shape} needs "
                                       f"{count * _ITEMSIZE[dtype]}")
            if not (0 <= b <= e <= data_len):
                raise SafetensorsError(f"'{path}': tensor '{name}' lies outside the file (truncated?)")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def raw(self, name):
        """(array view in storage dtype, dtype string). BF16 comes back as uint16 bits."""
        info = self.tensors[name]
        dtype = info["dtype"]
        if dtype not in _STORAGE:
            raise SafetensorsError(f"'{self.path}': tensor '{name}' has unsupported dtype {dtype}")
        b, e = info["data_offsets"]
        arr = np.frombuffer(self._map, dtype=np.dtype(_STORAGE[dtype]).newbyteorder("<"),
                            count=(e - b) // _ITEMSIZE[dtype], offset=self._data_start + b)
        return arr.reshape(info["shape"]), dtype

    def get(self, name):
        """The tensor as a float32 array (a copy)."""
        raw, dtype = self.raw(name)
        return to_f32(raw, dtype)

    def close(self):
        # numpy views may still point into the map; let garbage collection close it then.
        self._fh.close()


class Checkpoint:
    """All tensors of a checkpoint: a directory (model.safetensors, or an index over shards) or one file."""

    def __init__(self, path):
        self.files = {}
        self.where = {}  # tensor name -> SafetensorsFile
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError) as e:
                    raise SafetensorsError(f"cannot read the shard index '{index}' ({e})")
                for name, shard in weight_map.items():
                    if shard not in self.files:
                        self.files[shard] = SafetensorsFile(os.path.join(path, shard))
                    if name not in self.files[shard].tensors:
                        raise SafetensorsError(f"index says '{name}' is in '{shard}' but it is not there")
                    self.where[name] = self.files[shard]
            elif os.path.exists(single):
                self._add_file(single)
            else:
                shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
                if not shards:
                    raise SafetensorsError(f"no .safetensors files in '{path}'")
                for s in shards:
                    self._add_file(os.path.join(path, s))
        elif os.path.exists(path):
            self._add_file(path)
        else:
            raise SafetensorsError(f"'{path}' does not exist")

    def _add_file(self, p):
        f = SafetensorsFile(p)
        self.files[p] = f
        for name in f.tensors:
            self.where[name] = f

    def __contains__(self, name):
        return name in self.where

    def names(self):
        return list(self.where)

    def shape(self, name):
        return tuple(self.where[name].tensors[name]["shape"])

    def dtype(self, name):
        return self.where[name].tensors[name]["dtype"]

    def raw(self, name):
        return self.where[name].raw(name)

    def get(self, name):
        return self.where[name].get(name)


class SafetensorsWriter:
    """Streams a safetensors file: the header is written from the declared (name, dtype, shape) list,
    then each tensor's data is appended in declaration order, whole or in row chunks via write().
    Writes to PATH.tmp and renames on close() so a crash never leaves a half file at PATH."""

    def __init__(self, path, specs, metadata=None):
        self.path, self.tmp = path, path + ".tmp"
        self.specs = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in specs]
        header, off = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, dtype, shape in self.specs:
            if dtype not in ("F32", "BF16", "F16"):
                raise SafetensorsError(f"cannot write dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
        self._f = open(self.tmp, "wb")
        self._f.write(len(blob).to_bytes(8, "little"))
        self._f.write(blob)
        self._next = 0          # index of the tensor being written
        self._written = 0       # bytes of it written so far

    def write(self, name, array):
        """Append (part of) tensor `name`: float arrays are converted to the declared dtype."""
        if self._next >= len(self.specs) or self.specs[self._next][0] != name:
            expected = self.specs[self._next][0] if self._next < len(self.specs) else "nothing"
            raise SafetensorsError(f"writer got '{name}' but expected {expected}")
        _, dtype, shape = self.specs[self._next]
        if dtype == "BF16":
            data = array if array.dtype == np.uint16 else f32_to_bf16_bits(array)
        else:
            data = np.ascontiguousarray(array, dtype=_STORAGE[dtype])
        data = np.ascontiguousarray(data)
        self._f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        self._written += data.nbytes
        total = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        if self._written > total:
            raise SafetensorsError(f"too much data for tensor '{name}'")
        if self._written == total:
            self._next += 1
            self._written = 0

    def close(self):
        if self._next != len(self.specs):
            self._f.close()
            raise SafetensorsError(f"'{self.path}': tensor '{self.specs[self._next][0]}' was not (fully) written")
        self._f.close()
        os.replace(self.tmp, self.path)


def save_file(tensors, path, dtype="F32", metadata=None):
    """Write a dict name -> float array as one safetensors file, every tensor in `dtype` (F32 or BF16)."""
    specs = [(name, dtype, np.shape(arr)) for name, arr in tensors.items()]
    w = SafetensorsWriter(path, specs, metadata)
    for name, arr in tensors.items():
        w.write(name, np.asarray(arr))
    w.close()


def load_file(path):
    """Every tensor of a file or checkpoint directory as float32 arrays (small models only)."""
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.names()}
