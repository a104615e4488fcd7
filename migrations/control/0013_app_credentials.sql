-- App credentials: the logins PostgreSQL clients use at silo's wire front
-- door (`SILO_PG_LISTEN`). silo keeps only a SCRAM-SHA-256 verifier (the
-- password is shown once, when it is made). A revoked credential's row is
-- kept (with `revoked_at`) for the audit trail; its name may be reused.
CREATE TABLE app_credentials (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    verifier    text NOT NULL CHECK (verifier LIKE 'SCRAM-SHA-256$%'),
    read_only   boolean NOT NULL DEFAULT false,
    pool_mode   text NOT NULL DEFAULT 'session' CHECK (pool_mode IN ('session', 'transaction')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    rotated_at  timestamptz,
    revoked_at  timestamptz
);
CREATE UNIQUE INDEX app_credentials_live_name ON app_credentials (tenant_id, name)
    WHERE revoked_at IS NULL;
