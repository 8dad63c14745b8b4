"""TCP settings so that both ends of a database connection notice a partition.

When a network partition cuts a persister off, nothing is sent back: no FIN,
no RST. PostgreSQL then keeps the persister's sessions, and with them its
liveness lock, its fence and any open transaction's shard-map lock, for as
long as its TCP stack believes the connection alive: with Linux's defaults
about two hours for an idle connection (keepalive after 7200 s) and some
fifteen minutes for one with unacknowledged data (tcp_retries2). Meanwhile
no peer announces for the cut-off writer (its liveness lock looks held, see
`persister.liveness`), so every reader stalls, and a reshard waits for the
open transaction while holding up every other writer behind its lock.

So every connection a persister opens asks for probes on both ends:

- the server's side, through the `options` startup parameter
  (`tcp_keepalives_*` and `tcp_user_timeout` are per-session settings): the
  backend ends the session about 5 s after its client went silent, which
  releases the locks and lets the peers announce for the writer;
- the client's side, through libpq's `keepalives*` and `tcp_user_timeout`:
  after the partition heals, a persister that was waiting for an answer
  the server will never send (its session is gone, and the RST was lost)
  gets an error instead of waiting for hours.

Settings already present in the URL win, so an operator can tune them.
"""

from __future__ import annotations

from typing import Final

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Idle 2 s, then 3 probes 1 s apart: a silent peer is noticed after about 5 s;
# unacknowledged data is given up after 5 s as well.
CLIENT_PARAMETERS: Final = {
    "keepalives": "1",
    "keepalives_idle": "2",
    "keepalives_interval": "1",
    "keepalives_count": "3",
    "tcp_user_timeout": "5000",
}
SERVER_SETTINGS: Final = {
    "tcp_keepalives_idle": "2",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "5000",
}


def with_partition_detection(database_url: str) -> str:
    """`database_url` (a URL or key=value string) with the settings above added."""
    params = conninfo_to_dict(database_url)
    added: dict[str, str] = {k: v for k, v in CLIENT_PARAMETERS.items() if k not in params}
    options = str(params.get("options") or "")
    extra = [f"-c {name}={value}" for name, value in SERVER_SETTINGS.items() if name not in options]
    if extra:
        added["options"] = " ".join([options, *extra]).strip()
    if not added:
        return database_url
    return make_conninfo(database_url, **added)
