"""Names for the identifiers that flow through the persister."""

from typing import NewType

RoomId = NewType("RoomId", str)
EventId = NewType("EventId", str)
InstanceName = NewType("InstanceName", str)
StreamOrdering = NewType("StreamOrdering", int)
