-- silo control registry. A migration that has shipped is never edited: add a new file.

-- Tenant database servers. The admin URL carries a password, so it is stored
-- encrypted (AES-256-GCM) with the id of the key that sealed it.
CREATE TABLE db_servers (
    id               uuid PRIMARY KEY,
    name             text NOT NULL CONSTRAINT db_servers_name_key UNIQUE,
    admin_url_enc    bytea NOT NULL,
    key_id           text NOT NULL,
    -- Hard cap on connections silo opens to this server, over all tenant pools.
    max_connections  integer NOT NULL CHECK (max_connections > 0),
    -- How many tenant databases this server may hold.
    max_tenants      integer NOT NULL CHECK (max_tenants > 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'draining', 'unhealthy')),
    -- Tenant schema version of the server's template database; NULL until built.
    template_version bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id               uuid PRIMARY KEY,
    slug             text NOT NULL CHECK (slug ~ '^[a-z][a-z0-9-]{1,38}[a-z0-9]$'),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan             text NOT NULL,
    status           text NOT NULL CHECK (status IN ('provisioning', 'active', 'suspended', 'archiving',
                                                     'archived', 'restoring', 'deleting', 'deleted', 'failed')),
    server_id        uuid NOT NULL REFERENCES db_servers (id),
    database_name    text NOT NULL,
    role_name        text NOT NULL,
    -- The tenant role's password, encrypted; never returned, never logged.
    password_enc     bytea NOT NULL,
    key_id           text NOT NULL,
    -- Last provisioning step completed (crash recovery resumes after it).
    provision_step   text,
    last_error       text,
    schema_version   bigint,
    backup_schedule  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_backup_at   timestamptz,
    deleted_at       timestamptz
);

-- A slug names one live tenant; a deleted tenant frees its slug.
CREATE UNIQUE INDEX tenants_slug_key ON tenants (slug) WHERE status <> 'deleted';
CREATE INDEX tenants_status_idx ON tenants (status, id);
CREATE INDEX tenants_server_idx ON tenants (server_id) WHERE status <> 'deleted';

-- Pre-created spare databases (the warm pool), ready to be renamed into a tenant.
CREATE TABLE spares (
    database_name    text PRIMARY KEY,
    server_id        uuid NOT NULL REFERENCES db_servers (id),
    schema_version   bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX spares_server_idx ON spares (server_id, created_at);

-- Idempotency keys for tenant creation: a retry with the same key never creates twice.
CREATE TABLE idempotency_keys (
    key              text PRIMARY KEY,
    request_hash     bytea NOT NULL,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Long-running work reported through GET /admin/v1/operations/{id}.
CREATE TABLE operations (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL,
    tenant_id        uuid REFERENCES tenants (id),
    status           text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    progress         jsonb NOT NULL DEFAULT '{}'::jsonb,
    error            text,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_open_idx ON operations (status) WHERE status IN ('pending', 'running');

-- Every admin action, append-only.
CREATE TABLE audit_log (
    id               bigserial PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    actor            text NOT NULL,
    action           text NOT NULL,
    tenant_id        uuid REFERENCES tenants (id),
    detail           jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_tenant_idx ON audit_log (tenant_id, id);
