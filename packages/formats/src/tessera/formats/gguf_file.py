"""The GGUF container read directly: header, metadata and tensor table.

gguf's own ``GGUFReader`` builds a numpy view for every part of every metadata field, which
takes about two seconds on a file whose tokenizer has 50k tokens and 50k merges. This reader
walks the same layout with ``struct`` over one memory map (~0.1 s) and hands out tensor data as
zero-copy numpy views; the type tables come from the ``gguf`` package.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type -> (struct format, numpy dtype) for scalars; 8 is a string, 9 an array
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9
# the fewest bytes a metadata entry (key length, type, a 1-byte value) and a tensor entry (name
# length, dimension count, type, offset) take: a count claiming more than the file holds is refused
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MAX_ARRAY_DEPTH = 8


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    data_offset: int  # from the start of the file
    n_bytes: int
    _buf: np.ndarray

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes (uint8, a view of the memory map)."""
        return self._buf[self.data_offset : self.data_offset + self.n_bytes]


class GGUFFile:
    """``fields``: metadata key -> value (int, float, bool, str, or a list of them);
    ``tensors``: the tensor table in file order. Raises ValueError on anything malformed."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except struct.error as e:
            raise ValueError(f"the header ends early (truncated?): {e}") from None

    def _parse(self) -> None:
        buf = self._map
        if len(buf) < 24 or buf[:4] != GGUF_MAGIC:
            raise ValueError("no GGUF magic at the start of the file")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader takes 2 and 3, little-endian)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self.version = version
        self._pos = 24
        # counts are checked against the bytes left before any loop runs on them
        self._check_count(n_kv, _MIN_KV_BYTES, "metadata entries")
        self._check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensors")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {_short(name)} has {n_dims} dimensions (at most 8)")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, dims, qtype, offset))
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {_short(align)} is not a power of two")
        data_start = -(-self._pos // align) * align
        size = len(buf)
        whole = np.frombuffer(buf, dtype=np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, offset in infos:
            try:
                ttype = GGMLQuantizationType(qtype)
            except ValueError:
                raise ValueError(f"tensor {_short(name)} has unknown type number {qtype}") from None
            block, type_size = GGML_QUANT_SIZES[ttype]
            if 0 in dims:
                raise ValueError(f"tensor {_short(name)} has dimensions {list(dims)}, one of them 0")
            n = math.prod(dims)  # Python ints: a product past 64 bits is seen, not wrapped
            if n >= 2**63:
                raise ValueError(
                    f"tensor {_short(name)} has dimensions {list(dims)}, {n.bit_length()} bits of "
                    "elements (more than 64-bit sizes hold)"
                )
            if (dims and dims[0] % block) or n % block:
                raise ValueError(
                    f"tensor {_short(name)} ({ttype.name}, dimensions {list(dims)}): rows are not "
                    f"whole blocks of {block}"
                )
            n_bytes = n // block * type_size
            if n_bytes > size:
                raise ValueError(
                    f"tensor {_short(name)} has dimensions {list(dims)}: {n_bytes} bytes of {ttype.name} "
                    f"data, more than the whole file ({size} bytes)"
                )
            self.tensors.append(GGUFTensor(name, ttype, dims, data_start + offset, n_bytes, whole))

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _check_count(self, count: int, min_bytes: int, what: str) -> None:
        if count * min_bytes > len(self._map) - self._pos:
            raise ValueError(
                f"the header claims {count} {what}, more than the {len(self._map)}-byte file can hold"
            )

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        if start + n > len(self._map):
            raise ValueError(f"a string of {n} bytes at byte {self._pos} runs past the end of the file")
        self._pos = start + n
        return self._map[start : start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            (v,) = self._unpack(_SCALARS[vtype][0])
            return v
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                self._check_count(count, dtype.itemsize, f"values in the array {_short(key)}")
                values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return values.tolist()
            if etype == _STRING:
                self._check_count(count, 8, f"strings in the array {_short(key)}")
                return self._strings(count)
            if etype == _ARRAY:
                if depth >= _MAX_ARRAY_DEPTH:
                    raise ValueError(f"metadata {_short(key)} nests arrays deeper than {_MAX_ARRAY_DEPTH}")
                self._check_count(count, 12, f"arrays in the array {_short(key)}")
                return [self._value(etype, key, depth + 1) for _ in range(count)]
            raise ValueError(f"metadata {_short(key)} is an array of unknown value type {etype}")
        raise ValueError(f"metadata {_short(key)} has unknown value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        buf, pos, size = self._map, self._pos, len(self._map)
        out = []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise ValueError(f"a string of {n} bytes at byte {pos - 8} runs past the end of the file")
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out


def _short(text, limit: int = 60) -> str:
    """A name or value from the file as a message quotes it (a hostile one may be megabytes)."""
    text = str(text) if not isinstance(text, str) else text
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
