-- Both fences of a write transaction in one statement (one round trip):
-- the writer's liveness fence (0002) and the shard map's (0003). Returns the
-- shard-map epoch in force. In a VOLATILE plpgsql function each statement
-- takes a fresh snapshot, so the epoch is read after the lock is granted.
CREATE FUNCTION persister_fence(
    fence_ns INT, instance TEXT, expected_epoch BIGINT, shard_map_lock BIGINT
) RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    shard_epoch BIGINT;
BEGIN
    PERFORM stream_writer_fence(fence_ns, instance, expected_epoch);
    PERFORM pg_advisory_xact_lock_shared(shard_map_lock);
    SELECT coalesce(max(epoch), 0) INTO shard_epoch FROM shard_map_epochs;
    RETURN shard_epoch;
END
$$;
