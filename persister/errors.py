"""The one exception tree of the persister, and the HTTP answer each maps to.

    PersisterError                      500  M_UNKNOWN   (never for bad input)
    ├── BadRequest                      400  M_BAD_JSON / M_NOT_JSON / M_INVALID_PARAM / ...
    │   └── InvalidEvent                400  names the event index and field
    ├── Unauthorized                    401  M_MISSING_TOKEN / M_UNKNOWN_TOKEN
    ├── BodyTooLarge                    413  M_TOO_LARGE
    ├── NotMyShard                      421  M_WRONG_SHARD, carries the owner
    └── Unavailable                     503  M_LIMIT_EXCEEDED / M_UNAVAILABLE, carries Retry-After
        ├── Saturated                        the queues are full
        └── StoreUnavailable                 PostgreSQL cannot be reached

`persister.http.app` turns these into JSON bodies in one place; nothing else
knows about status codes.
"""

from __future__ import annotations


class PersisterError(Exception):
    status = 500
    errcode = "M_UNKNOWN"

    def __init__(self, message: str, *, errcode: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if errcode is not None:
            self.errcode = errcode


class BadRequest(PersisterError):
    status = 400
    errcode = "M_BAD_JSON"


class InvalidEvent(BadRequest):
    """One event of a request breaks a rule; the message starts with its index."""

    def __init__(self, index: int, field: str, problem: str, *, errcode: str | None = None) -> None:
        super().__init__(f"events[{index}].{field}: {problem}", errcode=errcode)
        self.index = index
        self.field = field


class Unauthorized(PersisterError):
    status = 401
    errcode = "M_UNKNOWN_TOKEN"


class BodyTooLarge(PersisterError):
    status = 413
    errcode = "M_TOO_LARGE"


class NotMyShard(PersisterError):
    status = 421
    errcode = "M_WRONG_SHARD"

    def __init__(self, room_id: str, owner: str, instance: str) -> None:
        super().__init__(f"room {room_id} belongs to {owner}, not {instance}")
        self.owner = owner


class Unavailable(PersisterError):
    status = 503
    errcode = "M_UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Saturated(Unavailable):
    errcode = "M_LIMIT_EXCEEDED"


class StoreUnavailable(Unavailable):
    pass
