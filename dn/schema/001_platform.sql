-- The platform schema: tenants and the data the trust page makes promises about.
--
-- Retention classes (see policies/ data map): events 15 days (debug capture), hourly_stats
-- 24 months, invoices 5 years (§ 35 of Act No. 563/1991 Coll.), everything else until the
-- tenant's deletion, at most 30 days after cancellation. A deleted tenant's row stays (status
-- 'deleted', personal data removed) while its invoices must be kept, so foreign keys RESTRICT:
-- deletion is an explicit, batched job, never a silent cascade.
--
-- Indexes: (tenant_id, id) on every large per-tenant table lets deletion and export walk one
-- tenant in primary-key batches; a time index on every table with a retention period lets the
-- retention job delete by age.

CREATE TABLE tenants (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug          text NOT NULL UNIQUE CHECK (slug ~ '^[a-z][a-z0-9-]{0,30}[a-z0-9]$'),
    display_name  text NOT NULL,
    plan          text NOT NULL DEFAULT 'standard',
    host          text NOT NULL,
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'suspended', 'cancelled', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    cancelled_at  timestamptz,
    deleted_at    timestamptz,
    CHECK (status NOT IN ('cancelled', 'deleted') OR cancelled_at IS NOT NULL),
    CHECK (status <> 'deleted' OR deleted_at IS NOT NULL)
);
-- The GDPR deletion job looks for cancelled tenants whose 30 days are running out.
CREATE INDEX tenants_cancelled_at_idx ON tenants (cancelled_at) WHERE status = 'cancelled';

CREATE TABLE users (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    email          text NOT NULL CHECK (email ~ '^[^@[:space:]]+@[^@[:space:]]+$'),
    name           text NOT NULL DEFAULT '',
    -- Django's format: pbkdf2_sha256$<iterations>$<salt>$<hash>
    password_hash  text NOT NULL CHECK (password_hash ~ '^pbkdf2_sha256\$[0-9]+\$[^$]+\$[^$]+$'),
    role           text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    totp_secret_ciphertext text CHECK (totp_secret_ciphertext ~ '^gAAAAA'),  -- Fernet token; MFA is optional
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_login_at  timestamptz
);
CREATE UNIQUE INDEX users_tenant_email_key ON users (tenant_id, lower(email));

CREATE TABLE api_keys (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    key_id          text NOT NULL UNIQUE CHECK (key_id ~ '^[A-Za-z0-9_-]{8,64}$'),  -- public identifier
    key_ciphertext  text NOT NULL CHECK (key_ciphertext ~ '^gAAAAA'),               -- Fernet token
    fernet_key_id   text NOT NULL,  -- which encryption key sealed it (key rotation re-seals by this)
    label           text NOT NULL DEFAULT '',
    created_by      bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id, id);
CREATE INDEX api_keys_fernet_key_idx ON api_keys (fernet_key_id);

-- Per-tenant sGTM container configuration (the CONTAINER_CONFIG string is a credential).
CREATE TABLE tenant_containers (
    tenant_id                    bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE RESTRICT,
    container_config_ciphertext  text NOT NULL CHECK (container_config_ciphertext ~ '^gAAAAA'),
    fernet_key_id                text NOT NULL,
    replicas                     integer NOT NULL DEFAULT 1 CHECK (replicas BETWEEN 1 AND 16),
    updated_at                   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_containers_fernet_key_idx ON tenant_containers (fernet_key_id);

CREATE TABLE tenant_settings (
    tenant_id   bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    key         text NOT NULL CHECK (key ~ '^[a-z][a-z0-9_.]{0,63}$'),
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

-- The GTM workspace JSON (export hands it back as-is).
CREATE TABLE gtm_workspaces (
    tenant_id    bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    version      integer NOT NULL CHECK (version > 0),
    workspace    jsonb NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

-- Real-time event capture for debugging: 15 days, personal data of end users (IP, user agent,
-- cookie id, order values).
CREATE TABLE events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    event_name   text NOT NULL,
    client_ip    inet,
    user_agent   text,
    cookie_id    text,
    payload      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_tenant_id_idx ON events (tenant_id, id);
CREATE INDEX events_occurred_at_idx ON events (occurred_at);

-- Aggregated request statistics per tenant and hour: 24 months, no personal data.
CREATE TABLE hourly_stats (
    tenant_id     bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    hour          timestamptz NOT NULL,
    requests      bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    errors        bigint NOT NULL DEFAULT 0 CHECK (errors >= 0),
    rate_limited  bigint NOT NULL DEFAULT 0 CHECK (rate_limited >= 0),
    bytes_in      bigint NOT NULL DEFAULT 0 CHECK (bytes_in >= 0),
    bytes_out     bigint NOT NULL DEFAULT 0 CHECK (bytes_out >= 0),
    p95_ms        integer CHECK (p95_ms >= 0),
    PRIMARY KEY (tenant_id, hour)
);
CREATE INDEX hourly_stats_hour_idx ON hourly_stats (hour);

-- Invoices: kept 5 years for the accounting law, also after the tenant's deletion.
CREATE TABLE invoices (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    number           text NOT NULL UNIQUE,
    issued_at        date NOT NULL,
    due_at           date,
    paid_at          date,
    amount           numeric(12, 2) NOT NULL CHECK (amount >= 0),
    vat_amount       numeric(12, 2) NOT NULL DEFAULT 0 CHECK (vat_amount >= 0),
    currency         char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    billing_name     text NOT NULL,
    billing_address  text NOT NULL,
    billing_vat_id   text
);
CREATE INDEX invoices_tenant_idx ON invoices (tenant_id, id);
CREATE INDEX invoices_issued_at_idx ON invoices (issued_at);

-- GDPR deletion requests: due 30 days after they are received.
CREATE TABLE deletion_requests (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    received_at   timestamptz NOT NULL DEFAULT now(),
    due_at        timestamptz NOT NULL,
    completed_at  timestamptz,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    CHECK (due_at > received_at)
);
CREATE INDEX deletion_requests_due_idx ON deletion_requests (due_at) WHERE completed_at IS NULL;
CREATE INDEX deletion_requests_tenant_idx ON deletion_requests (tenant_id);

-- The day-to-day role works on the platform data; it owns nothing and cannot change the schema.
GRANT SELECT, INSERT, UPDATE, DELETE ON
    tenants, users, api_keys, tenant_containers, tenant_settings, gtm_workspaces,
    events, hourly_stats, invoices, deletion_requests
TO dn_app;
