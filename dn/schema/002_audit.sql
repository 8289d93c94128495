-- The append-only, hash-chained audit log of privileged actions (see dn/audit.py).
--
-- Who may do what:
--   dn_audit_owner (NOLOGIN)  owns every object here; nobody logs in as it.
--   dn_app                    INSERT and SELECT on audit_log, SELECT on audit_head/audit_anchor,
--                             EXECUTE on audit_prune(). No UPDATE, DELETE or TRUNCATE anywhere.
-- Triggers refuse UPDATE, DELETE and TRUNCATE on audit_log and audit_anchor for every role
-- (a superuser can still switch triggers off: the hash chain, the signed anchors and
-- `dn audit verify` exist for exactly that case). The one way to remove entries is
-- audit_prune(): it deletes only a prefix of the chain, only entries older than 30 days (the
-- lowest retention dn accepts), and only after writing the signed anchor that keeps the rest
-- verifiable.
--
-- 7236785841486719348 = the chain's advisory lock key (bytes "dn:audit"); dn/audit.py takes it
-- too, so appends are serialized and the chain never forks.

-- The audit objects are created as their owner, which needs CREATE on the schema only now.
GRANT CREATE ON SCHEMA public TO dn_audit_owner;
SET LOCAL ROLE dn_audit_owner;

CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY CHECK (seq > 0),
    at          timestamptz NOT NULL,
    actor       text NOT NULL,
    actor_key   text,                 -- SHA256 fingerprint of the operator's SSH public key
    command     text NOT NULL,
    args        jsonb NOT NULL,       -- secrets and personal data redacted before hashing
    tenant      text,
    host        text,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'failed', 'interrupted')),
    exit_code   integer NOT NULL,
    request_id  text NOT NULL,
    pid         integer NOT NULL,
    machine     text NOT NULL,
    prev_hash   text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash        text NOT NULL UNIQUE CHECK (hash ~ '^[0-9a-f]{64}$'),
    format      smallint NOT NULL DEFAULT 1 CHECK (format = 1)
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_tenant_idx ON audit_log (tenant, seq) WHERE tenant IS NOT NULL;

-- The chain head: the last appended entry, maintained only by the append trigger. verify
-- compares it with the table, which reveals a deleted tail.
CREATE TABLE audit_head (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq   bigint NOT NULL,
    hash  text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    at    timestamptz
);
INSERT INTO audit_head (id, seq, hash, at) VALUES (true, 0, repeat('0', 64), NULL);

-- One row per prune: the last pruned entry's seq and hash, signed with dn's Ed25519 anchor key.
CREATE TABLE audit_anchor (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    anchor_seq    bigint NOT NULL UNIQUE,
    anchor_hash   text NOT NULL CHECK (anchor_hash ~ '^[0-9a-f]{64}$'),
    anchor_at     timestamptz NOT NULL,
    pruned_from   bigint NOT NULL,
    pruned_count  bigint NOT NULL CHECK (pruned_count > 0),
    signed_at     timestamptz NOT NULL,
    public_key    text NOT NULL CHECK (public_key ~ '^[A-Za-z0-9+/]{43}=$'),     -- 32 raw bytes, base64
    signature     text NOT NULL CHECK (signature ~ '^[A-Za-z0-9+/]{86}==$'),     -- 64 bytes, base64
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Append: the entry must extend the head (next seq, prev_hash = head hash, time not going back
-- and taken from this server's clock), then becomes the head.
CREATE FUNCTION audit_log_append() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    h public.audit_head;
BEGIN
    SELECT * INTO h FROM public.audit_head WHERE id FOR UPDATE;
    IF NEW.seq IS DISTINCT FROM h.seq + 1 THEN
        RAISE EXCEPTION 'audit_log: entry % does not follow the chain head %', NEW.seq, h.seq
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.prev_hash IS DISTINCT FROM h.hash THEN
        RAISE EXCEPTION 'audit_log: entry % is not chained to the head''s hash', NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;
    IF h.at IS NOT NULL AND NEW.at < h.at THEN
        RAISE EXCEPTION 'audit_log: entry % is older than the head', NEW.seq USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.at > clock_timestamp() + interval '1 second' OR NEW.at < clock_timestamp() - interval '5 minutes' THEN
        RAISE EXCEPTION 'audit_log: entry % time must come from the database clock', NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE public.audit_head SET seq = NEW.seq, hash = NEW.hash, at = NEW.at WHERE id;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_append BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_append();

CREATE FUNCTION audit_log_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    -- Only audit_prune() (running as the owner, with the anchor already written) removes rows.
    IF TG_OP = 'DELETE' AND current_user = 'dn_audit_owner'
       AND OLD.seq <= coalesce(nullif(current_setting('dn.audit_prune_upto', true), '')::bigint, 0) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_guard BEFORE UPDATE OR DELETE ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_guard();

CREATE FUNCTION audit_refuse() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    -- The head moves only inside audit_log_append(), which runs as the owner.
    IF TG_TABLE_NAME = 'audit_head' AND TG_OP = 'UPDATE' AND current_user = 'dn_audit_owner' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_anchor_guard BEFORE UPDATE OR DELETE ON audit_anchor FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_anchor_no_truncate BEFORE TRUNCATE ON audit_anchor FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_head_guard BEFORE UPDATE OR DELETE ON audit_head FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();

-- Prune the chain's prefix up to p_anchor_seq. The caller signs the anchor; the database cannot
-- check an Ed25519 signature, but it checks everything else and writes the anchor first.
CREATE FUNCTION audit_prune(p_anchor_seq bigint, p_anchor_hash text, p_pruned_from bigint,
                            p_pruned_count bigint, p_signed_at timestamptz,
                            p_public_key text, p_signature text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    e public.audit_log;
    first_seq bigint;
    n bigint;
    newest timestamptz;
    expected_from bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7236785841486719348);
    PERFORM 1 FROM public.audit_head WHERE id FOR UPDATE;
    SELECT * INTO e FROM public.audit_log WHERE seq = p_anchor_seq;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_prune: entry % does not exist', p_anchor_seq USING ERRCODE = 'no_data_found';
    END IF;
    IF e.hash IS DISTINCT FROM p_anchor_hash THEN
        RAISE EXCEPTION 'audit_prune: the anchor hash is not entry %''s hash', p_anchor_seq
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT min(seq), count(*), max(at) INTO first_seq, n, newest FROM public.audit_log WHERE seq <= p_anchor_seq;
    SELECT coalesce(max(anchor_seq), 0) + 1 INTO expected_from FROM public.audit_anchor;
    IF first_seq IS DISTINCT FROM expected_from OR first_seq IS DISTINCT FROM p_pruned_from
       OR n IS DISTINCT FROM p_pruned_count OR n IS DISTINCT FROM p_anchor_seq - first_seq + 1 THEN
        RAISE EXCEPTION 'audit_prune: entries %..% are not the unbroken start of the chain', p_pruned_from, p_anchor_seq
            USING ERRCODE = 'check_violation';
    END IF;
    IF newest >= clock_timestamp() - interval '30 days' THEN
        RAISE EXCEPTION 'audit_prune: refuses entries younger than 30 days' USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO public.audit_anchor (anchor_seq, anchor_hash, anchor_at, pruned_from, pruned_count,
                                     signed_at, public_key, signature)
    VALUES (p_anchor_seq, p_anchor_hash, e.at, first_seq, n, p_signed_at, p_public_key, p_signature);
    PERFORM set_config('dn.audit_prune_upto', p_anchor_seq::text, true);
    DELETE FROM public.audit_log WHERE seq <= p_anchor_seq;
    PERFORM set_config('dn.audit_prune_upto', '', true);
    RETURN n;
END
$$;

REVOKE ALL ON audit_log, audit_head, audit_anchor FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_log_append(), audit_log_guard(), audit_refuse() FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_prune(bigint, text, bigint, bigint, timestamptz, text, text) FROM PUBLIC;
GRANT SELECT, INSERT ON audit_log TO dn_app;
GRANT SELECT ON audit_head, audit_anchor TO dn_app;
GRANT EXECUTE ON FUNCTION audit_prune(bigint, text, bigint, bigint, timestamptz, text, text) TO dn_app;

RESET ROLE;
REVOKE CREATE ON SCHEMA public FROM dn_audit_owner;
