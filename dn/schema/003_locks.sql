-- Operation locks (see dn/locks.py): one row per held tenant/host lock, naming its holder.
--
-- The row is the record; the lock itself is a session-level advisory lock on lock_key held by
-- the holder's database session. A row whose advisory lock nobody holds belongs to a run that
-- died (its session ended): the lock is stale, and stays until someone breaks it explicitly
-- (`dn lock break`), after looking at what that run left behind.

CREATE TABLE op_locks (
    resource     text PRIMARY KEY CHECK (resource ~ '^(tenant|host|audit|db):[a-z0-9][a-z0-9-]{0,62}$'),
    lock_key     bigint NOT NULL UNIQUE,
    actor        text NOT NULL,
    command      text NOT NULL,
    request_id   text NOT NULL,
    pid          integer NOT NULL,
    machine      text NOT NULL,
    backend_pid  integer NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

GRANT SELECT, INSERT, DELETE ON op_locks TO dn_app;
