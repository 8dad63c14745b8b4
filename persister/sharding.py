"""Which persister owns a room (contract section 2).

`sha256` is Synapse's rule, so operators can predict placement:
the room ID's SHA-256 digest read as a little-endian integer, mod N.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def sha256_owner(room_id: str, writers: Sequence[str]) -> str:
    if len(writers) == 1:
        return writers[0]
    digest = hashlib.sha256(room_id.encode("utf-8")).digest()
    return writers[int.from_bytes(digest, "little") % len(writers)]
