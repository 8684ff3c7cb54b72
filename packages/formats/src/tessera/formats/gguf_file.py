"""The GGUF container read directly: header, metadata and tensor table.

gguf's own ``GGUFReader`` builds a numpy view for every part of every metadata field, which
takes about two seconds on a file whose tokenizer has 50k tokens and 50k merges. This reader
walks the same layout with ``struct`` over one memory map (~0.1 s) and hands out tensor data as
zero-copy numpy views; the type tables come from the ``gguf`` package.
"""

from __future__ import annotations

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
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), qtype, offset))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align} is not a power of two")
        data_start = -(-self._pos // align) * align
        whole = np.frombuffer(buf, dtype=np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, offset in infos:
            try:
                ttype = GGMLQuantizationType(qtype)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown type number {qtype}") from None
            block, size = GGML_QUANT_SIZES[ttype]
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if n % block:
                raise ValueError(f"tensor {name}: {n} elements are not whole blocks of {block}")
            self.tensors.append(GGUFTensor(name, ttype, dims, data_start + offset, n // block * size, whole))

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        if start + n > len(self._map):
            raise ValueError("a string runs past the end of the file")
        self._pos = start + n
        return self._map[start : start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            (v,) = self._unpack(_SCALARS[vtype][0])
            return v
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                end = self._pos + count * dtype.itemsize
                if end > len(self._map):
                    raise ValueError("an array runs past the end of the file")
                values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
                self._pos = end
                return values.tolist()
            if etype == _STRING:
                return self._strings(count)
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        buf, pos, size = self._map, self._pos, len(self._map)
        out = []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise ValueError("a string runs past the end of the file")
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out
