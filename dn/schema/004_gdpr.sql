-- GDPR deletion, retention enforcement and Fernet key rotation (dn/gdpr/, policies/datamap.toml).
--
-- 1. A tenant being erased is in status 'deleting' from the start of its deletion request until
--    its certificate is written, then 'deleted' for good (its row stays, minimised, as long as
--    retained accounting records point at it).
-- 2. A write guard refuses new data for such a tenant: an INSERT or UPDATE on a tenant-bound
--    table for a tenant in status 'deleting' or 'deleted' fails. The guard share-locks the
--    tenant's row, so it serialises with the UPDATE that starts a deletion: a write either
--    commits before the deletion starts (and is then deleted with the rest) or is refused.
--    dn's own maintenance (minimising retained rows, re-encrypting under a new key) sets the
--    session setting dn.gdpr_bypass = 'on'; the application never does. This protects against
--    the application writing, not against a database user set on writing.
-- 3. The deletion journal (gdpr_runs, gdpr_steps): the plan as executed, every step recorded
--    before and after it runs, the certificate. It is evidence: the day-to-day role may insert
--    and update, never delete. It names requests by deletion_requests.id without a foreign key:
--    the journal and its certificates stay readable whatever happens to the request rows.
-- 4. fernet_keys: the ids (never the keys) of the Fernet keys dn has seen in DN_FERNET_KEYS,
--    and which were retired, so `dn keys status` / `dn verify` can prove no value remains under
--    a retired key. users gets the key id column its TOTP secret lacked.

ALTER TABLE tenants DROP CONSTRAINT tenants_status_check;
ALTER TABLE tenants ADD CONSTRAINT tenants_status_check
    CHECK (status IN ('active', 'suspended', 'cancelled', 'deleting', 'deleted'));

ALTER TABLE users ADD COLUMN totp_fernet_key_id text;

CREATE FUNCTION gdpr_write_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    refused bigint;
BEGIN
    IF coalesce(current_setting('dn.gdpr_bypass', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    -- Lock the tenants the statement wrote for first (FOR SHARE waits for, and conflicts with,
    -- the status UPDATE that starts a deletion), then read their status with a fresh snapshot.
    PERFORM 1 FROM public.tenants t WHERE t.id IN (SELECT DISTINCT n.tenant_id FROM new_rows n) FOR SHARE;
    SELECT t.id INTO refused
      FROM public.tenants t
     WHERE t.id IN (SELECT DISTINCT n.tenant_id FROM new_rows n)
       AND t.status IN ('deleting', 'deleted')
     LIMIT 1;
    IF refused IS NOT NULL THEN
        RAISE EXCEPTION '%: tenant % is being deleted (GDPR request); writes for it are refused', TG_TABLE_NAME, refused
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'api_keys', 'tenant_containers', 'tenant_settings', 'gtm_workspaces',
                             'events', 'hourly_stats', 'invoices'] LOOP
        EXECUTE format('CREATE TRIGGER gdpr_write_guard_insert AFTER INSERT ON %I REFERENCING NEW TABLE AS new_rows'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION gdpr_write_guard()', t);
        EXECUTE format('CREATE TRIGGER gdpr_write_guard_update AFTER UPDATE ON %I REFERENCING NEW TABLE AS new_rows'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION gdpr_write_guard()', t);
    END LOOP;
END
$$;

-- A tenant in deletion never comes back: 'deleting' moves only to 'deleted', 'deleted' nowhere.
CREATE FUNCTION gdpr_tenant_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    IF (OLD.status = 'deleting' AND NEW.status NOT IN ('deleting', 'deleted'))
       OR (OLD.status = 'deleted' AND NEW.status <> 'deleted') THEN
        RAISE EXCEPTION 'tenants: tenant % is %; it cannot become % again', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER gdpr_tenant_guard BEFORE UPDATE OF status ON tenants FOR EACH ROW EXECUTE FUNCTION gdpr_tenant_guard();

CREATE TABLE gdpr_runs (
    request_id          bigint PRIMARY KEY,
    tenant_id           bigint NOT NULL,
    tenant_slug         text NOT NULL,
    previous_status     text NOT NULL,
    plan                jsonb NOT NULL,
    started_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at         timestamptz,
    certificate         jsonb,
    certificate_sha256  text CHECK (certificate_sha256 ~ '^[0-9a-f]{64}$'),
    CHECK ((finished_at IS NULL) = (certificate IS NULL))
);
CREATE INDEX gdpr_runs_tenant_idx ON gdpr_runs (tenant_id);

CREATE TABLE gdpr_steps (
    request_id   bigint NOT NULL REFERENCES gdpr_runs (request_id) ON DELETE RESTRICT,
    position     smallint NOT NULL CHECK (position > 0),
    step         text NOT NULL CHECK (step ~ '^[a-z][a-z0-9-]{0,31}$'),
    state        text NOT NULL CHECK (state IN ('started', 'done')),
    attempts     integer NOT NULL DEFAULT 1 CHECK (attempts > 0),
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    result       jsonb,
    PRIMARY KEY (request_id, step),
    UNIQUE (request_id, position),
    CHECK ((state = 'done') = (finished_at IS NOT NULL))
);

CREATE TABLE fernet_keys (
    key_id         text PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    first_seen_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    primary_since  timestamptz,
    retired_at     timestamptz
);

GRANT SELECT, INSERT, UPDATE ON gdpr_runs, gdpr_steps, fernet_keys TO dn_app;
