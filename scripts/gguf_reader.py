"""gguf_reader.py: parse GGUF (v2/v3) files and dequantize their tensors to float32 with numpy.

API:
    g = GGUFFile(path)
    g.metadata            dict: key -> value (ints, floats, bools, strings; arrays as Python lists)
    g.tensors             dict: name -> TensorInfo (.shape in numpy/PyTorch order, .dims in GGUF order,
                          .type (ggml type id), .type_name, .offset (absolute), .nbytes)
    g.load(name)          float32 array in PyTorch orientation: a linear weight comes back (out, in)
    g.load(name, r0, r1)  only rows r0..r1-1 of the (outer dims flattened, row length) view
    g.raw(name)           the tensor's bytes as a read-only uint8 view into the memory map

File layout (little-endian): uint32 magic "GGUF", uint32 version, uint64 n_tensors, uint64 n_kv; then n_kv
entries (string key, uint32 value type, value); then n_tensors infos (string name, uint32 n_dims,
uint64 dims[n_dims], uint32 ggml type, uint64 offset into the data section); the data section starts at the
next multiple of general.alignment (default 32). A string is uint64 length + UTF-8 bytes; an array is
uint32 element type + uint64 count + elements.

GGUF lists dims innermost first: dims[0] is the length of a row (the contiguous axis), so the numpy shape
is dims reversed. Quantized types pack each row in blocks of 32 (legacy quants) or 256 (K-quants) values.

Running this file (`python3 scripts/gguf_reader.py [FILE.gguf]`) runs a self-test of the block decoders
against values worked out by hand, and with a file prints its metadata summary and tensor table.
"""
import mmap
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np


class GGUFError(Exception):
    """A malformed or unsupported GGUF file; the message is one line meant for the user."""


# ggml type id -> (name, values per block, bytes per block). Only some of these can be dequantized
# (see _DEQUANT); the rest are listed so errors can name the type.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}

# Metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_OF = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
             12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    dims: tuple       # GGUF order, dims[0] = row length
    type: int         # ggml type id
    offset: int       # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self):
        """numpy / PyTorch order (dims reversed): a linear weight is (out_features, in_features)."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self):
        return GGML_TYPES.get(self.type, (f"type{self.type}",))[0]

    @property
    def n_elements(self):
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Sequential little-endian reader over the mapped header, with bounds checks."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"'{self.path}' is truncated inside its header")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.scalar("<Q")
        if n > (1 << 30):
            raise GGUFError(f"'{self.path}': implausible string length {n} in header")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > (1 << 32):
                raise GGUFError(f"'{self.path}': implausible array length {count} in header")
            if etype in _NUMPY_OF:  # numeric arrays in one go (token types, scores)
                dt = np.dtype(_NUMPY_OF[etype])
                arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt)
                return (arr.astype(bool) if etype == 7 else arr).tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"'{self.path}': unknown metadata value type {vtype}")


class GGUFFile:
    def __init__(self, path):
        self.path = path
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise GGUFError(f"cannot open '{path}' ({e.strerror})")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 24:
            raise GGUFError(f"'{path}' is too small to be a GGUF file")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(memoryview(self._map), path)
        if bytes(cur.take(4)) != b"GGUF":
            raise GGUFError(f"'{path}' is not a GGUF file (bad magic)")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            if self.version in (0x02000000, 0x03000000):
                raise GGUFError(f"'{path}' is a big-endian GGUF file, which is not supported")
            raise GGUFError(f"'{path}': unsupported GGUF version {self.version} (expected 2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > (1 << 24) or n_kv > (1 << 24):
            raise GGUFError(f"'{path}': implausible tensor/metadata counts ({n_tensors}, {n_kv})")
        self.metadata = {}
        self.metadata_types = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<I")
            self.metadata[key] = cur.value(vtype)
            self.metadata_types[key] = vtype
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 8:
                raise GGUFError(f"'{path}': tensor '{name}' has {n_dims} dims")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        self.alignment = int(self.metadata.get("general.alignment", 32))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"'{path}': general.alignment {self.alignment} is not a power of two")
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors = {}
        for name, dims, ttype, off in infos:
            if ttype not in GGML_TYPES:
                raise GGUFError(f"'{path}': tensor '{name}' has unknown ggml type {ttype}")
            tname, block, block_bytes = GGML_TYPES[ttype]
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block != 0:
                raise GGUFError(f"'{path}': tensor '{name}' row length {dims[0]} is not a multiple of the "
                                f"{tname} block size {block}")
            nbytes = n // block * block_bytes
            start = self.data_start + off
            if off % self.alignment != 0:
                raise GGUFError(f"'{path}': tensor '{name}' offset {off} is not aligned to {self.alignment}")
            if start + nbytes > size:
                raise GGUFError(f"'{path}' is truncated: tensor '{name}' ends past the end of the file")
            self.tensors[name] = TensorInfo(name, dims, ttype, start, nbytes)

    def raw(self, name):
        info = self._info(name)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def _info(self, name):
        if name not in self.tensors:
            raise GGUFError(f"'{self.path}' has no tensor '{name}'")
        return self.tensors[name]

    def load(self, name, r0=None, r1=None):
        """float32 array of tensor `name`, numpy order; with r0/r1 only those rows of the 2-D view
        (all outer dims flattened, row length dims[0]), returned as (r1 - r0, row length)."""
        info = self._info(name)
        if info.type not in _DEQUANT:
            raise GGUFError(f"'{self.path}': tensor '{name}' has type {info.type_name}, which this reader "
                            f"cannot dequantize (supported: {', '.join(GGML_TYPES[t][0] for t in _DEQUANT)})")
        _, block, block_bytes = GGML_TYPES[info.type]
        row_len = info.dims[0] if info.dims else 1
        n_rows = info.n_elements // row_len if row_len else 0
        row_bytes = row_len // block * block_bytes
        whole = r0 is None and r1 is None
        r0 = 0 if r0 is None else r0
        r1 = n_rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= n_rows:
            raise GGUFError(f"row range {r0}..{r1} outside tensor '{name}' with {n_rows} rows")
        buf = np.frombuffer(self._map, dtype=np.uint8, count=(r1 - r0) * row_bytes, offset=info.offset + r0 * row_bytes)
        values = _DEQUANT[info.type](buf.reshape(-1, block_bytes) if block_bytes else buf)
        values = values.reshape(-1)
        return values.reshape(info.shape) if whole else values.reshape(r1 - r0, row_len)

    def close(self):
        self._fh.close()


# ---------------------------------------------------------------------------------------------------
# Block decoders. Each takes a (n_blocks, block_bytes) uint8 array and returns (n_blocks, block_size)
# float32. Field layouts are given in each docstring (offsets in bytes within a block).

def _f16(blocks, off):
    """The fp16 field at byte `off` of every block, as (n_blocks, 1) float32."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").astype(np.float32)


def _plain(dtype):
    def dequant(buf):
        return np.ascontiguousarray(buf).reshape(-1).view(dtype).astype(np.float32)
    return dequant


def _bf16(buf):
    bits = np.ascontiguousarray(buf).reshape(-1).view("<u2").astype(np.uint32)
    return (bits << np.uint32(16)).view(np.float32)


def _nibbles(qs):
    """(n, 16) packed bytes -> (n, 32): low nibbles are values 0..15, high nibbles values 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _q4_0(b):
    """d:f16 @0, qs[16] @2. x = d * (nibble - 8)."""
    return _f16(b, 0) * (_nibbles(b[:, 2:18]) - 8.0)


def _q4_1(b):
    """d:f16 @0, m:f16 @2, qs[16] @4. x = d * nibble + m."""
    return _f16(b, 0) * _nibbles(b[:, 4:20]) + _f16(b, 2)


def _high_bits32(qh_bytes):
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j for value j."""
    return np.unpackbits(qh_bytes, axis=1, bitorder="little").astype(np.float32)


def _q5_0(b):
    """d:f16 @0, qh:u32 @2 (5th bit of value j is bit j), qs[16] @6. x = d * (q5 - 16)."""
    return _f16(b, 0) * (_nibbles(b[:, 6:22]) + 16.0 * _high_bits32(b[:, 2:6]) - 16.0)


def _q5_1(b):
    """d:f16 @0, m:f16 @2, qh:u32 @4, qs[16] @8. x = d * q5 + m."""
    return _f16(b, 0) * (_nibbles(b[:, 8:24]) + 16.0 * _high_bits32(b[:, 4:8])) + _f16(b, 2)


def _q8_0(b):
    """d:f16 @0, qs:int8[32] @2. x = d * q."""
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q8_1(b):
    """d:f16 @0, s:f16 @2 (sum, unused here), qs:int8[32] @4. x = d * q."""
    return _f16(b, 0) * b[:, 4:36].view(np.int8).astype(np.float32)


def _q8_k(b):
    """d:f32 @0, qs:int8[256] @4, bsums:int16[16] @260 (unused here). x = d * q."""
    d = np.ascontiguousarray(b[:, 0:4]).view("<f4").astype(np.float32)
    return d * b[:, 4:260].view(np.int8).astype(np.float32)


def _scale_min_k4(sc):
    """The 12 packed bytes of Q4_K/Q5_K -> (scales, mins), each (n, 8) float32, 6 bits each.
    Sub-block j < 4: scale = byte[j] & 63, min = byte[j+4] & 63. j >= 4: the low 4 bits come from
    byte[j+4] (scale: low nibble, min: high nibble), the top 2 bits from the top of byte[j-4] (scale)
    and byte[j] (min)."""
    lo_s = sc[:, 0:4] & 63
    lo_m = sc[:, 4:8] & 63
    hi_s = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    hi_m = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return (np.concatenate([lo_s, hi_s], axis=1).astype(np.float32),
            np.concatenate([lo_m, hi_m], axis=1).astype(np.float32))


def _q4_k(b):
    """d:f16 @0, dmin:f16 @2, scales[12] @4, qs[128] @16. Eight sub-blocks of 32. Values 64c..64c+31 are
    the low nibbles of qs[32c..32c+31] (sub-block 2c), values 64c+32.. the high nibbles (sub-block 2c+1).
    x = d * scale[s] * q - dmin * min[s]."""
    n = b.shape[0]
    scales, mins = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    y = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return y.reshape(n, 256)


def _q5_k(b):
    """d:f16 @0, dmin:f16 @2, scales[12] @4, qh[32] @16, qs[128] @48. Like Q4_K, plus a 5th bit: for value
    l of sub-block s (l in 0..31), bit s of qh[l]. x = d * scale[s] * q5 - dmin * min[s]."""
    n = b.shape[0]
    scales, mins = _scale_min_k4(b[:, 4:16])
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    qh = b[:, 16:48]                                                      # (n, 32)
    bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # (n, 8 sub-blocks, 32)
    q += 16.0 * bits
    y = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return y.reshape(n, 256)


def _q6_k(b):
    """ql[128] @0, qh[64] @128, scales:int8[16] @192, d:f16 @208. Two halves of 128 values; in half h,
    value 32k + l (k in 0..3, l in 0..31) has low 4 bits from ql[64h + l + 32*(k%2)] (low nibble for
    k < 2, high nibble for k >= 2) and high 2 bits from qh[32h + l] >> 2k, and scale scales[8h + 2k + l//16].
    x = d * scale * (q6 - 32)."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)            # (half, which 32-byte group, l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)          # (half, -, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)                       # (n, 2, 4, 32): k = 0..3
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3                                                # (n, 2, 4, 32)
    q = (low | (high << 4)).astype(np.float32) - 32.0
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 4, 2)  # (half, k, l // 16)
    scale = np.repeat(sc, 16, axis=3)                                         # (n, 2, 4, 32)
    return (_f16(b, 208)[:, :, None, None] * scale * q).reshape(n, 256)


def _q2_k(b):
    """scales[16] @0 (low nibble: scale, high nibble: min), qs[64] @16, d:f16 @80, dmin:f16 @82. Two halves of
    128 values; in half h, value 32j + 16k + l (j = 2-bit plane 0..3, k in 0..1, l in 0..15) is
    (qs[32h + 16k + l] >> 2j) & 3, with sub-block 8h + 2j + k. x = d * scale * q - dmin * min."""
    n = b.shape[0]
    sc = b[:, 0:16]
    qs = b[:, 16:80].reshape(n, 2, 1, 32)                                     # (half, -, 16k + l)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).astype(np.float32).reshape(n, 16, 16)           # (half, j, k, l) -> 16 subs
    scale = (_f16(b, 80) * (sc & 0x0F).astype(np.float32))[:, :, None]
    minv = (_f16(b, 82) * (sc >> 4).astype(np.float32))[:, :, None]
    return (scale * q - minv).reshape(n, 256)


def _q3_k(b):
    """hmask[32] @0, qs[64] @32, scales[12] @96, d:f16 @108. Sixteen 6-bit signed scales (stored + 32): scale
    i has low 4 bits from byte i (i < 8, low nibble) or byte i-8 (i >= 8, high nibble), and top 2 bits
    (byte 8 + i%4 >> 2*(i//4)) & 3. Value 128h + 32j + 16k + l has 2 low bits (qs[32h + 16k + l] >> 2j) & 3
    and subtracts 4 unless bit 4h + j of hmask[16k + l] is set; sub-block 8h + 2j + k.
    x = d * (scale - 32) * q."""
    n = b.shape[0]
    hm = b[:, 0:32].reshape(n, 1, 1, 32)                                      # (-, -, 16k + l)
    qs = b[:, 32:96].reshape(n, 2, 1, 32)
    raw = b[:, 96:108]
    low = np.concatenate([raw[:, 0:8] & 0x0F, raw[:, 0:8] >> 4], axis=1)      # (n, 16)
    i = np.arange(16)
    high = (raw[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3         # (n, 16)
    scales = (low | (high << 4)).astype(np.float32) - 32.0
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q2 = ((qs >> shifts) & 3).astype(np.float32)                             # (n, 2, 4, 32)
    bit_index = (4 * np.arange(2).reshape(2, 1) + np.arange(4).reshape(1, 4)).astype(np.uint8)  # (2, 4)
    hbit = (hm >> bit_index.reshape(1, 2, 4, 1)) & 1                          # (n, 2, 4, 32)
    q = q2 - 4.0 * (1 - hbit)
    y = (_f16(b, 108) * scales)[:, :, None] * q.reshape(n, 16, 16)
    return y.reshape(n, 256)


_DEQUANT = {
    0: _plain("<f4"), 1: _plain("<f2"), 30: _bf16, 2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 9: _q8_1,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k, 15: _q8_k,
}


# ---------------------------------------------------------------------------------------------------
# Self-test: single blocks whose values are worked out by hand from the layouts above.

def _self_test():
    def f16(x):
        return np.array([x], dtype="<f2").view(np.uint8)

    # Q4_0: d = 0.5, byte j = (j + 1) | (15 - j) << 4 -> value j = 0.5*(j+1-8), value 16+j = 0.5*(15-j-8).
    qs = np.array([((j + 1) & 15) | ((15 - j) << 4) for j in range(16)], dtype=np.uint8)
    blk = np.concatenate([f16(0.5), qs])[None]
    want = [0.5 * (((j + 1) & 15) - 8) for j in range(16)] + [0.5 * (15 - j - 8) for j in range(16)]
    assert np.array_equal(_q4_0(blk)[0], np.float32(want)), "Q4_0"

    # Q4_1: d = 0.25, m = -1: value = 0.25 * nibble - 1.
    blk = np.concatenate([f16(0.25), f16(-1.0), qs])[None]
    want = [0.25 * ((j + 1) & 15) - 1 for j in range(16)] + [0.25 * (15 - j) - 1 for j in range(16)]
    assert np.array_equal(_q4_1(blk)[0], np.float32(want)), "Q4_1"

    # Q8_0: d = 2, q = -16..15.
    q = np.arange(-16, 16, dtype=np.int8)
    blk = np.concatenate([f16(2.0), q.view(np.uint8)])[None]
    assert np.array_equal(_q8_0(blk)[0], 2.0 * q.astype(np.float32)), "Q8_0"

    # Q5_0: qh = 0x80000001 sets the 5th bit of value 0 and value 31; all nibbles 0; d = 1.
    blk = np.concatenate([f16(1.0), np.array([1, 0, 0, 0x80], np.uint8), np.zeros(16, np.uint8)])[None]
    want = np.full(32, -16.0, np.float32)
    want[0] = want[31] = 0.0
    assert np.array_equal(_q5_0(blk)[0], want), "Q5_0"

    # Q4_K: d = 1, dmin = 0.5. Sub-block 0: scale 3, min 2 (bytes 0 and 4). Sub-block 5: scale
    # = (byte 9 & 15) | (byte 1 >> 6) << 4 = 1 | 1<<4 = 17, min = (byte 9 >> 4) | (byte 5 >> 6) << 4 = 2 | 0 = 2.
    sc = np.zeros(12, np.uint8)
    sc[0], sc[4] = 3, 2
    sc[1] = 0x40           # scale of sub-block 1 = 0, top bits of sub-block 5's scale = 1
    sc[9] = 0x21           # sub-block 5: scale low 1, min low 2
    qsk = np.zeros(128, np.uint8)
    qsk[0] = 0x07          # value 0 (sub-block 0) = 7, value 32 (sub-block 1) = 0
    qsk[64 + 7] = 0x90     # chunk 2, l = 7: value 128+7 (sub 4) = 0, value 160+7 (sub 5) = 9
    blk = np.concatenate([f16(1.0), f16(0.5), sc, qsk])[None]
    y = _q4_k(blk)[0]
    assert y[0] == 3 * 7 - 0.5 * 2 and y[1] == -1.0, "Q4_K sub-block 0"
    assert y[160 + 7] == 17 * 9 - 0.5 * 2 and y[160] == -1.0, "Q4_K sub-block 5"

    # Q6_K: d = 0.5, scales[0..15] = 1..16. Value 96 + 3 (half 0, k = 3, l = 3): high nibble of ql[32+3],
    # bits 6-7 of qh[3]; its scale is scales[2*3 + 0] = 7. q6 = 5 | 2<<4 = 37 -> x = 0.5*7*(37-32).
    ql = np.zeros(128, np.uint8)
    ql[35] = 0x50
    qh = np.zeros(64, np.uint8)
    qh[3] = 2 << 6
    blk = np.concatenate([ql, qh, np.arange(1, 17, dtype=np.int8).view(np.uint8), f16(0.5)])[None]
    y = _q6_k(blk)[0]
    assert y[99] == 0.5 * 7 * 5, "Q6_K value"
    assert y[0] == 0.5 * 1 * -32, "Q6_K zero"

    # Q2_K: d = 1, dmin = 1; scales byte for sub-block 8h + 2j + k = 8*1 + 2*2 + 1 = 13 is 0x35 (scale 5,
    # min 3). Value 128 + 64 + 16 + 2: qs[32 + 16 + 2] bits 4-5 = 2 -> x = 5*2 - 3 = 7.
    sc2 = np.zeros(16, np.uint8)
    sc2[13] = 0x35
    qs2 = np.zeros(64, np.uint8)
    qs2[50] = 2 << 4
    blk = np.concatenate([sc2, qs2, f16(1.0), f16(1.0)])[None]
    y = _q2_k(blk)[0]
    assert y[210] == 7.0 and y[208] == -3.0 and y[0] == 0.0, "Q2_K"

    # Q3_K: d = 1. Scale 13 (h = 1, j = 2, k = 1): low 4 bits from byte 5 high nibble, top bits from byte 9
    # bits 6-7 (13 // 4 = 3). Stored 0x20 + 5 = 37 -> scale 5. Value 128+64+16+2 = 210: qs[50] bits 4-5 = 3,
    # hmask[18] bit 6 (4h + j) set -> q = 3; value 211: q bits 0, hmask clear -> q = -4.
    hm = np.zeros(32, np.uint8)
    hm[18] = 1 << 6
    qs3 = np.zeros(64, np.uint8)
    qs3[50] = 3 << 4
    sc3 = np.zeros(12, np.uint8)
    sc3[5] = 5 << 4
    sc3[9] = 2 << 6
    blk = np.concatenate([hm, qs3, sc3, f16(1.0)])[None]
    y = _q3_k(blk)[0]
    assert y[210] == 15.0 and y[211] == -20.0, "Q3_K"
    assert y[0] == (0 - 32) * -4.0, "Q3_K zero scale"   # stored scale 0 -> -32, q = -4
    print("gguf_reader self-test passed")


if __name__ == "__main__":
    _self_test()
    if len(sys.argv) > 1:
        g = GGUFFile(sys.argv[1])
        print(f"GGUF v{g.version}, {len(g.metadata)} metadata keys, {len(g.tensors)} tensors")
        for k, v in g.metadata.items():
            s = repr(v)
            print(f"  {k} = {s[:100] + '...' if len(s) > 100 else s}")
        counts = {}
        for t in g.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        print("  tensor types:", counts)
