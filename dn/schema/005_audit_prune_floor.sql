-- The audit prune stops trusting its caller (see dn/audit.py, "Retention").
--
-- Before: audit_prune() stored the signing time the caller supplied and refused only entries
-- younger than 30 days, so the day-to-day role could prune 31..89-day-old entries and date the
-- anchor as it liked. Now:
--   * the anchor's signed_at is the database's transaction time (now()); the caller signs a
--     message over that value (it reads now() in the same transaction) and cannot choose another;
--   * the floor is the configured retention, kept in audit_settings, a row only its owner
--     (dn_audit_owner, i.e. `dn db init` as the owner role) can change, never below the trust
--     page's 90 days.
-- Whether an anchor's key may be trusted is decided by `dn audit verify` against the keys
-- pinned in the configuration (audit.anchor_keys); the database cannot check an Ed25519
-- signature.

GRANT CREATE ON SCHEMA public TO dn_audit_owner;
SET LOCAL ROLE dn_audit_owner;

CREATE TABLE audit_settings (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    retention_days  integer NOT NULL CHECK (retention_days BETWEEN 90 AND 3650),
    changed_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed_by      text NOT NULL DEFAULT session_user
);
INSERT INTO audit_settings (id, retention_days) VALUES (true, 90);

CREATE FUNCTION audit_settings_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    -- One row, changed only through audit_set_retention() (which runs as the owner).
    IF TG_OP = 'UPDATE' AND current_user = 'dn_audit_owner' THEN
        NEW.changed_at := clock_timestamp();
        NEW.changed_by := session_user;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_settings: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_settings_guard BEFORE INSERT OR UPDATE OR DELETE ON audit_settings
    FOR EACH ROW EXECUTE FUNCTION audit_settings_guard();
CREATE TRIGGER audit_settings_no_truncate BEFORE TRUNCATE ON audit_settings
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();

-- Set the prune floor (retention.audit_days). Only the owner role may call it: `dn db init`.
CREATE FUNCTION audit_set_retention(p_days integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    UPDATE public.audit_settings SET retention_days = p_days WHERE id AND retention_days IS DISTINCT FROM p_days;
    RETURN p_days;
END
$$;

DROP FUNCTION audit_prune(bigint, text, bigint, bigint, timestamptz, text, text);

-- Prune the chain's prefix up to p_anchor_seq, entries at least the configured retention old.
-- The anchor's signed_at is now(): the caller must have signed that value.
CREATE FUNCTION audit_prune(p_anchor_seq bigint, p_anchor_hash text, p_pruned_from bigint,
                            p_pruned_count bigint, p_public_key text, p_signature text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    e public.audit_log;
    first_seq bigint;
    n bigint;
    newest timestamptz;
    expected_from bigint;
    floor_days integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7236785841486719348);
    PERFORM 1 FROM public.audit_head WHERE id FOR UPDATE;
    SELECT retention_days INTO floor_days FROM public.audit_settings WHERE id;
    IF floor_days IS NULL OR floor_days < 90 THEN
        RAISE EXCEPTION 'audit_prune: no retention floor is set' USING ERRCODE = 'check_violation';
    END IF;
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
    IF newest >= now() - make_interval(days => floor_days) THEN
        RAISE EXCEPTION 'audit_prune: refuses entries younger than % days (the configured retention)', floor_days
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO public.audit_anchor (anchor_seq, anchor_hash, anchor_at, pruned_from, pruned_count,
                                     signed_at, public_key, signature)
    VALUES (p_anchor_seq, p_anchor_hash, e.at, first_seq, n, now(), p_public_key, p_signature);
    PERFORM set_config('dn.audit_prune_upto', p_anchor_seq::text, true);
    DELETE FROM public.audit_log WHERE seq <= p_anchor_seq;
    PERFORM set_config('dn.audit_prune_upto', '', true);
    RETURN n;
END
$$;

-- An anchor's signing time is the database's: none may be inserted but by audit_prune().
CREATE FUNCTION audit_anchor_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    IF current_user IS DISTINCT FROM 'dn_audit_owner' OR NEW.signed_at IS DISTINCT FROM now() THEN
        RAISE EXCEPTION 'audit_anchor: an anchor is written only by audit_prune(), dated by the database'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_anchor_insert BEFORE INSERT ON audit_anchor FOR EACH ROW EXECUTE FUNCTION audit_anchor_insert();

REVOKE ALL ON audit_settings FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_settings_guard(), audit_anchor_insert() FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_set_retention(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_prune(bigint, text, bigint, bigint, text, text) FROM PUBLIC;
GRANT SELECT ON audit_settings TO dn_app;
GRANT EXECUTE ON FUNCTION audit_prune(bigint, text, bigint, bigint, text, text) TO dn_app;

RESET ROLE;
REVOKE CREATE ON SCHEMA public FROM dn_audit_owner;
