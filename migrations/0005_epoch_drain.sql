-- A shard-map epoch change that pauses only the rooms that move
-- (protocol in persister/storage/shard_map.py).
--
-- Before: the install took one lock exclusively that every write transaction
-- held shared, so every room waited for the transactions in flight. Now each
-- write transaction holds a lock named by the epoch it routed by, and an
-- epoch is installed first (routing follows it at once) and *drained*
-- afterwards: the drain waits for the transactions of the older epochs only,
-- and only a writer about to commit a room it gained needs the drain.

-- NULL while an installed epoch is being drained: it routes, but is not yet
-- in force. The drain sets it, so the events of one epoch still fall
-- exactly in (its sequence_at_start, the next in-force epoch's].
ALTER TABLE shard_map_epochs ALTER COLUMN sequence_at_start DROP NOT NULL;

-- The advisory-lock namespace of the epoch locks: (namespace, epoch).
CREATE FUNCTION shard_map_epoch_lock_ns() RETURNS INT LANGUAGE sql IMMUTABLE
AS $$ SELECT 1886846981 $$;  -- 0x70770005

-- A write transaction's shard-map fence, taken before any ordering is drawn:
-- the newest epoch, its sequence_at_start (NULL: not yet in force), and, if
-- it is not the epoch the writer routed by, its map. Each lock is taken before the epoch is read by
-- a later statement, which in READ COMMITTED sees an install that committed
-- while we waited. A transaction that finds a newer epoch also holds that
-- epoch's lock, so the writer may go on under it if its rooms did not move,
-- rather than roll back.
CREATE FUNCTION shard_map_fence(
    routed_epoch BIGINT,
    OUT epoch BIGINT, OUT sequence_at_start BIGINT,
    OUT writers TEXT[], OUT sharding TEXT, OUT pins JSON
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    locked BIGINT := routed_epoch;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(shard_map_epoch_lock_ns(), routed_epoch::INT);
    LOOP
        SELECT e.epoch, e.sequence_at_start INTO epoch, sequence_at_start
        FROM shard_map_epochs AS e ORDER BY e.epoch DESC LIMIT 1;
        IF NOT FOUND THEN
            epoch := 0;  -- nothing stored yet: no writer routes by anything
            sequence_at_start := 0;
        END IF;
        EXIT WHEN epoch = locked;
        PERFORM pg_advisory_xact_lock_shared(shard_map_epoch_lock_ns(), epoch::INT);
        locked := epoch;
    END LOOP;
    IF epoch <> routed_epoch THEN
        SELECT e.writers, e.sharding,
               (SELECT coalesce(json_object_agg(p.room_id, p.instance_name), '{}'::json)
                FROM shard_map_pins AS p WHERE p.epoch = e.epoch)
        INTO writers, sharding, pins
        FROM shard_map_epochs AS e WHERE e.epoch = locked;
    END IF;
END
$$;

-- Put an installed epoch in force: wait until no transaction of an epoch
-- since the last one in force is left, then record where the sequence is.
-- Returns the epoch's sequence_at_start. Concurrent drains queue on the
-- epoch's row; the later ones find it done.
--
-- The wait polls with try-locks on purpose. A blocking exclusive request
-- would make every later shared request on that lock queue behind it, and a
-- writer that has not yet seen the new epoch would stall on it even for
-- rooms that do not move.
CREATE FUNCTION shard_map_drain(target BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    start BIGINT;
    since BIGINT;
    older BIGINT;
BEGIN
    SELECT sequence_at_start INTO start FROM shard_map_epochs WHERE epoch = target FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no shard map epoch %', target USING ERRCODE = 'PS003';
    END IF;
    IF start IS NOT NULL THEN
        RETURN start;
    END IF;
    -- Transactions of epochs before the last one in force all ended before
    -- that epoch was drained.
    SELECT coalesce(max(epoch), 0) INTO since
    FROM shard_map_epochs WHERE epoch < target AND sequence_at_start IS NOT NULL;
    FOR older IN
        SELECT epoch FROM shard_map_epochs WHERE epoch >= since AND epoch < target ORDER BY epoch
    LOOP
        WHILE NOT pg_try_advisory_xact_lock(shard_map_epoch_lock_ns(), older::INT) LOOP
            PERFORM pg_sleep(0.001);
        END LOOP;
    END LOOP;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO start
    FROM events_stream_seq;
    UPDATE shard_map_epochs SET sequence_at_start = start WHERE epoch = target;
    RETURN start;
END
$$;

-- Both fences of a write transaction in one statement, as before, now with
-- the epoch lock instead of the single shard-map lock.
DROP FUNCTION persister_fence(INT, TEXT, BIGINT, BIGINT);
CREATE FUNCTION persister_fence(
    fence_ns INT, instance TEXT, liveness_epoch BIGINT, routed_epoch BIGINT,
    OUT shard_epoch BIGINT, OUT sequence_at_start BIGINT,
    OUT writers TEXT[], OUT sharding TEXT, OUT pins JSON
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM stream_writer_fence(fence_ns, instance, liveness_epoch);
    SELECT f.epoch, f.sequence_at_start, f.writers, f.sharding, f.pins
    INTO shard_epoch, sequence_at_start, writers, sharding, pins
    FROM shard_map_fence(routed_epoch) AS f;
END
$$;
