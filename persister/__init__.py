"""persister: room-sharded Matrix event persistence on PostgreSQL."""

__version__ = "0.1.0"
