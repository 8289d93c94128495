-- The read-only preview identity: what CI's `dn preview` of a pull request connects as
-- (.github/workflows/preview.yml, docs/ci-security.md). A pull request's code runs in that job
-- and can use whatever credential it holds, so the role can do exactly what a preview does with
-- the database: read the tenant registry (dn/tenants.py _records: the tenants' identity, plan,
-- host and status, and their dn.* settings). Nothing else: no write anywhere, no users, API keys,
-- container configs, events, invoices, GDPR journal, locks or audit log.
--
-- dn_preview is a NOLOGIN group made with dn's other roles (dn/db.py role_setup_sql); the login
-- role CI uses is a member of it and of nothing else:
--   CREATE ROLE dn_ci_preview LOGIN PASSWORD '...' IN ROLE dn_preview;

DO $$BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dn_preview', current_database());
END$$;
GRANT USAGE ON SCHEMA public TO dn_preview;
GRANT SELECT (id, slug, display_name, plan, host, status, created_at) ON tenants TO dn_preview;
GRANT SELECT (tenant_id, key, value) ON tenant_settings TO dn_preview;
