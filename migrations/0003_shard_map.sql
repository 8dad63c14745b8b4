-- The writer pool as a stored map with epochs (contract section 7).
-- The newest epoch is in force. `stream_writers.events` only seeds epoch 1.

CREATE TABLE shard_map_epochs (
    epoch           BIGINT PRIMARY KEY,
    writers         TEXT[] NOT NULL,
    -- Every process must place rooms the same way, so the scheme is stored
    -- with the writers rather than read from each process's config.
    sharding        TEXT NOT NULL,
    -- The events sequence when this epoch took force: no writer of an
    -- older epoch commits an ordering above it (readers retire removed
    -- writers once they have announced this far).
    sequence_at_start BIGINT NOT NULL,
    created_ts      BIGINT NOT NULL
);

CREATE TABLE shard_map_pins (
    epoch         BIGINT NOT NULL REFERENCES shard_map_epochs (epoch),
    room_id       TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    PRIMARY KEY (epoch, room_id)
);
