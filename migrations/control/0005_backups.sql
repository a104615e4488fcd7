-- Per-tenant backups in S3-compatible storage.

-- Each tenant's backup data key (32 random bytes), sealed under the master
-- key. Removing it makes the tenant's backups unreadable (crypto-shredding).
ALTER TABLE tenants ADD COLUMN backup_key_enc bytea;
ALTER TABLE tenants ADD COLUMN backup_key_id text;
ALTER TABLE tenants ADD COLUMN backup_key_erased_at timestamptz;

CREATE TABLE backups (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    -- manual (API/CLI), scheduled (cron), archive (before archival), final (before delete)
    kind             text NOT NULL CHECK (kind IN ('manual', 'scheduled', 'archive', 'final')),
    -- running → succeeded | failed; a pruned backup is deleted (objects removed, row kept briefly)
    status           text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'deleted')),
    bucket           text NOT NULL,
    object_key       text NOT NULL,
    manifest_key     text NOT NULL,
    -- Set while the multipart upload is open, so a sweep can abort it after a crash.
    upload_id        text,
    storage_class    text,
    part_size        bigint,
    parts            integer,
    size_bytes       bigint,
    sha256           text,
    key_id           text,
    server_version   text,
    pg_dump_version  text,
    schema_version   bigint,
    -- Rows per table at the dump's snapshot; verification compares against these.
    row_counts       jsonb,
    error            text,
    -- The cron slot a scheduled backup was run for: one run per tenant per slot, across replicas.
    scheduled_for    timestamptz,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    verified_at      timestamptz,
    verify_error     text
);

-- At most one backup of a tenant runs at a time.
CREATE UNIQUE INDEX backups_one_running ON backups (tenant_id) WHERE status = 'running';
-- A scheduled slot is claimed once; a failed attempt frees it for a retry.
CREATE UNIQUE INDEX backups_one_per_slot ON backups (tenant_id, scheduled_for)
    WHERE scheduled_for IS NOT NULL AND status IN ('running', 'succeeded');
CREATE INDEX backups_tenant_idx ON backups (tenant_id, started_at DESC);
CREATE INDEX backups_open_idx ON backups (status) WHERE status = 'running';

