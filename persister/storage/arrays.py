"""One-dimensional array parameters in PostgreSQL's binary format, fast.

A batch binds ~35 arrays (one per column of every table it writes). For a
plain `list` psycopg first finds out what it holds (scanning it for a
non-null element, and every integer for the widest) and then dumps it
element by element through generic dumpers: at a few requests per batch that
was ~12 % of the persister's CPU. The columns' types are known here, so
each array is wrapped in the type that says it (`TextArray`, `Int8Array`,
`BoolArray`) and dumped in one pass by the lanes' own binding
(`persister.storage.pipeline`). Handed to psycopg, they are still lists,
and psycopg dumps them the slow way.

Binary array layout (array_send): ndim, has-nulls flag, element type OID,
then per dimension its length and lower bound (1), then per element its
length (-1 for NULL) and bytes.
"""

from __future__ import annotations

import struct

from psycopg import postgres

_HEADER = struct.Struct("!iiiii")
_EMPTY = struct.Struct("!iii")
_LENGTH = struct.Struct("!i")
_INT8 = struct.Struct("!iq")
_NULL = _LENGTH.pack(-1)
_TRUE = _LENGTH.pack(1) + b"\x01"
_FALSE = _LENGTH.pack(1) + b"\x00"


class TextArray(list[str | None]):
    """A `text[]` parameter."""


class Int8Array(list[int]):
    """A `bigint[]` parameter."""


class BoolArray(list[bool]):
    """A `boolean[]` parameter."""


def _array(element_oid: int, has_nulls: bool, count: int, body: bytes) -> bytes:
    if not count:
        return _EMPTY.pack(0, 0, element_oid)
    return _HEADER.pack(1, has_nulls, element_oid, count, 1) + body


def dump_text_array(items: list[str | None]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    has_nulls = False
    for item in items:
        if item is None:
            has_nulls = True
            append(_NULL)
        else:
            data = item.encode()
            append(_LENGTH.pack(len(data)))
            append(data)
    return _array(_TEXT_OID, has_nulls, len(items), b"".join(parts))


def dump_int8_array(items: list[int]) -> bytes:
    pack = _INT8.pack
    return _array(_INT8_OID, False, len(items), b"".join([pack(8, item) for item in items]))


def dump_bool_array(items: list[bool]) -> bytes:
    return _array(
        _BOOL_OID, False, len(items), b"".join([_TRUE if item else _FALSE for item in items])
    )


_TEXT_OID = postgres.types["text"].oid
_INT8_OID = postgres.types["int8"].oid
_BOOL_OID = postgres.types["bool"].oid
