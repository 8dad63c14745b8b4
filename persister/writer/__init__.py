"""The write path: queues, batch loops and the persister service that owns them."""
