"""Minimal reader for R lazy-load databases (``Rdata.rdb`` + ``Rdata.rdx``).

The janeaustenr package stores each novel as an R character vector of lines. Only the small
subset of R's XDR serialisation needed for such data (vectors, pairlists, symbols, strings) is
implemented, which avoids a dependency on a full R-data library for the build.
"""

import gzip
import struct
import zlib
from typing import Any

_NIL, _REF = 254, 255
_SPECIAL = {242, 241, 250, 251, 252, 253}  # environments and markers we never dereference
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19


class RDataError(ValueError):
    """The bytes are not an R serialisation this reader understands."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise RDataError("only XDR (binary big-endian) serialisation is supported")
        self.data = data
        self.pos = 2
        self.refs: list[Any] = []
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            skip = self.int()  # length of the native encoding name
            self.pos += skip

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:
            high, low = self.int(), self.int()
            n = (high << 32) + low
        return n

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL or kind in _SPECIAL:
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = self.item()
            rest = self.item()
            del attrs
            return [(tag, head), *(rest or [])]
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (_LGL, _INT):
            n = self.length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _REAL:
            n = self.length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (_STR, _VEC):
            values = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if names is not None and kind == _VEC:
                return dict(zip(names, values, strict=True))
        return values


def unserialize(data: bytes) -> Any:
    """An R object as Python lists/dicts/strings (named lists become dicts)."""
    return _Reader(data).item()


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All objects of a lazy-load database, by name."""
    index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    objects: dict[str, Any] = {}
    for name, (offset, size) in index["variables"].items():
        blob = rdb[offset : offset + size]
        objects[name] = unserialize(zlib.decompress(blob[4:]))
    return objects
