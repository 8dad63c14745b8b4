-- The events stream and the room DAG (contract section 5).

CREATE SEQUENCE events_stream_seq START WITH 1;
-- Backfilled events count downwards: this sequence is read as -nextval.
CREATE SEQUENCE events_backfill_stream_seq START WITH 1;

CREATE TABLE rooms (
    room_id      TEXT PRIMARY KEY,
    room_version TEXT NOT NULL
);

CREATE TABLE events (
    stream_ordering      BIGINT NOT NULL,
    topological_ordering BIGINT NOT NULL,
    event_id             TEXT NOT NULL,
    room_id              TEXT NOT NULL,
    type                 TEXT NOT NULL,
    state_key            TEXT,
    sender               TEXT NOT NULL,
    origin_server_ts     BIGINT NOT NULL,
    received_ts          BIGINT NOT NULL,
    outlier              BOOLEAN NOT NULL,
    rejection_reason     TEXT,
    instance_name        TEXT NOT NULL,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_ordering_key UNIQUE (stream_ordering)
);
CREATE INDEX events_room_topological ON events (room_id, topological_ordering, stream_ordering);

CREATE TABLE event_json (
    event_id     TEXT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    json         TEXT NOT NULL,
    room_version TEXT NOT NULL
);

CREATE TABLE event_edges (
    event_id      TEXT NOT NULL,
    prev_event_id TEXT NOT NULL,
    room_id       TEXT NOT NULL,
    CONSTRAINT event_edges_key UNIQUE (event_id, prev_event_id)
);
-- "Which stored events list X as a prev?" decides forward extremities.
CREATE INDEX event_edges_prev ON event_edges (prev_event_id);

CREATE TABLE event_auth (
    event_id TEXT NOT NULL,
    auth_id  TEXT NOT NULL,
    room_id  TEXT NOT NULL
);
CREATE INDEX event_auth_event ON event_auth (event_id);

CREATE TABLE event_forward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);

CREATE TABLE event_backward_extremities (
    room_id  TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);
-- An arriving event looks itself up here to stop being a backward extremity.
CREATE INDEX event_backward_extremities_event ON event_backward_extremities (event_id);

CREATE TABLE rejections (
    event_id   TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    last_check BIGINT NOT NULL
);

CREATE TABLE stream_positions (
    stream_name   TEXT NOT NULL,
    instance_name TEXT NOT NULL,
    stream_id     BIGINT NOT NULL,
    PRIMARY KEY (stream_name, instance_name)
);
