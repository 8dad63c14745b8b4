"""Matrix canonical JSON (spec appendix "Canonical JSON").

Object keys sorted by Unicode code point, no insignificant whitespace, strings
as raw UTF-8 with only the escapes JSON requires (`"`, `\\`, the short forms
`\\b \\f \\n \\r \\t`, and lowercase `\\u00XX` for other control characters),
integers only, no floats.

msgspec's sorted encoder produces exactly these bytes: its escaping matches
the `canonicaljson` library (which Synapse uses) for every code point - DEL,
U+2028/U+2029 and "/" are all left raw by both - and sorting by UTF-8 bytes
equals sorting by code point. tests/unit/test_canonical_json.py holds the
property test that keeps this claim honest. What msgspec would accept but
canonical JSON forbids (floats, out-of-range integers, non-string keys,
exotic types) is rejected by a walk before encoding.
"""

from __future__ import annotations

import msgspec

CANONICAL_INT_MAX = 2**53 - 1
CANONICAL_INT_MIN = -CANONICAL_INT_MAX

# Deeper than any real event; a guard against self-referencing containers,
# which would otherwise make the walk below loop forever.
MAX_NESTING = 10_000

_encoder = msgspec.json.Encoder(order="sorted")


class CanonicalJsonError(ValueError):
    """The value cannot be represented in Matrix canonical JSON."""


def encode_canonical(value: object, *, strict_ints: bool = True) -> bytes:
    """Encode `value` (dict/list/tuple/str/int/bool/None) as Matrix canonical JSON.

    `strict_ints=False` lets integers outside the canonical range through; it
    exists for room versions 1-5, which predate the range rule.

    Raises CanonicalJsonError for floats, out-of-range integers, non-string
    keys, unsupported types, lone surrogates and absurd nesting.
    """
    check_canonical(value, strict_ints=strict_ints)
    return encode_canonical_trusted(value)


def encode_canonical_trusted(value: object) -> bytes:
    """Encode a value already known to hold only canonical-JSON types.

    For hot paths whose input came out of a JSON decoder that rejects floats
    (so only dict/list/str/int/bool/None can occur): skips the type walk but
    still turns encoder failures into CanonicalJsonError.
    """
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError as exc:
        raise CanonicalJsonError("strings must be valid Unicode (lone surrogate)") from exc
    except RecursionError as exc:
        raise CanonicalJsonError("value is nested too deeply") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise CanonicalJsonError(str(exc)) from exc


def check_canonical(value: object, *, strict_ints: bool = True) -> None:
    """Raise CanonicalJsonError unless `value` can be encoded as canonical JSON.

    Iterative, so deeply nested input cannot exhaust the Python stack.
    Exact type checks on purpose: subclasses (IntEnum, str subclasses, ...)
    may encode differently across JSON libraries.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        if kind is str or kind is bool or node is None:
            continue
        if kind is int:
            if strict_ints:
                _check_int_range(node)  # type: ignore[arg-type]
            continue
        if depth >= MAX_NESTING:
            raise CanonicalJsonError("value is nested too deeply")
        if kind is dict:
            _push_dict(node, depth + 1, stack)  # type: ignore[arg-type]
        elif kind is list or kind is tuple:
            stack.extend((item, depth + 1) for item in node)  # type: ignore[attr-defined]
        elif kind is float:
            raise CanonicalJsonError(f"floats are not allowed in canonical JSON: {node!r}")
        else:
            raise CanonicalJsonError(f"type {kind.__name__} is not allowed in canonical JSON")


def _push_dict(node: dict[object, object], depth: int, stack: list[tuple[object, int]]) -> None:
    for key, item in node.items():
        if type(key) is not str:
            raise CanonicalJsonError(f"object keys must be strings, not {type(key).__name__}")
        stack.append((item, depth))


def _check_int_range(number: int) -> None:
    if not CANONICAL_INT_MIN <= number <= CANONICAL_INT_MAX:
        raise CanonicalJsonError(
            f"integer {_short(number)} is outside the canonical JSON range "
            f"[{CANONICAL_INT_MIN}, {CANONICAL_INT_MAX}]"
        )


def _short(number: int) -> str:
    # str() of a huge int is slow and capped by sys.int_info; never needed in full.
    if number.bit_length() > 256:
        return f"{'-' if number < 0 else ''}<{number.bit_length()}-bit integer>"
    return str(number)
