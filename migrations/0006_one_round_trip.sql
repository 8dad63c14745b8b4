-- A batch whose rooms a lane already knows goes in ONE round trip: BEGIN,
-- fence, draw, write and COMMIT pipelined (persister.writer.lane). The write
-- is on its way before the fence's answer is read, so the fence and the
-- write cannot report what they find and let the lane decide, as in two
-- round trips: they refuse, the transaction rolls back, and the lane writes
-- the batch the two-round-trip way.

-- Both fences, refusing (PS004) unless the newest shard-map epoch is the one
-- the lane routed by. Whether it is in force matters only for rooms the
-- writer gained with it, and the lane never sends those this way.
CREATE FUNCTION persister_fence_routed(
    fence_ns INT, instance TEXT, liveness_epoch BIGINT, routed_epoch BIGINT
) RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found RECORD;
BEGIN
    SELECT * INTO found FROM persister_fence(fence_ns, instance, liveness_epoch, routed_epoch);
    IF found.shard_epoch <> routed_epoch THEN
        RAISE EXCEPTION 'shard map epoch % is not the routed epoch %',
            found.shard_epoch, routed_epoch USING ERRCODE = 'PS004';
    END IF;
END
$$;

-- Refuses a batch (PS005) whose write found the rooms other than the lane
-- remembered them.
CREATE FUNCTION persister_expect(ok BOOLEAN, what TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'the rooms are not as remembered: %', what USING ERRCODE = 'PS005';
    END IF;
    RETURN TRUE;
END
$$;
