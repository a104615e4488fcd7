-- Plans as data: what a tenant of each plan may use. NULL in a limit means
-- "silo's setting applies" (or, for quotas and clinic limits, no limit).
-- The three plans silo had as fixed names become seed rows, with the same
-- connection limits, so every existing tenant keeps its plan.
CREATE TABLE plans (
    name                 text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,39}$'),
    -- The tenant role's CONNECTION LIMIT, shared by the routers' pools.
    connection_limit     integer NOT NULL CHECK (connection_limit BETWEEN 1 AND 10000),
    -- Database size past which the tenant becomes read-only (usage collector).
    storage_quota_bytes  bigint CHECK (storage_quota_bytes > 0),
    -- App API requests per second per tenant (else SILO_APP_RATE_LIMIT).
    requests_per_second  integer CHECK (requests_per_second BETWEEN 1 AND 1000000),
    -- Client connections at once on the PostgreSQL front door (else
    -- SILO_PG_MAX_CLIENTS_PER_TENANT).
    wire_clients         integer CHECK (wire_clients BETWEEN 1 AND 100000),
    -- Clinic app limits, enforced by the clinic API.
    max_staff            integer CHECK (max_staff >= 0),
    max_patients         integer CHECK (max_patients >= 0),
    -- A tenant created on this plan expires (is suspended) after this many days.
    trial_days           integer CHECK (trial_days BETWEEN 1 AND 3650),
    -- Backups of its tenants: a tenant's own schedule wins, then this, then
    -- SILO_BACKUP_SCHEDULE; the retention counts, then SILO_BACKUP_KEEP_*.
    backup_schedule      text,
    backup_keep_last     integer CHECK (backup_keep_last BETWEEN 1 AND 1000),
    backup_keep_daily    integer CHECK (backup_keep_daily BETWEEN 0 AND 1000),
    backup_keep_weekly   integer CHECK (backup_keep_weekly BETWEEN 0 AND 1000),
    backup_keep_monthly  integer CHECK (backup_keep_monthly BETWEEN 0 AND 1000),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

INSERT INTO plans (name, connection_limit) VALUES
    ('free', 5), ('standard', 20), ('premium', 50);

-- Any plan a tenant row names that is not a seed (none should exist) gets
-- a row too, so the reference below holds.
INSERT INTO plans (name, connection_limit)
SELECT DISTINCT plan, 20 FROM tenants WHERE plan NOT IN (SELECT name FROM plans)
ON CONFLICT DO NOTHING;

-- A plan in use cannot be deleted (the API answers 409); renaming is not offered.
ALTER TABLE tenants ADD CONSTRAINT tenants_plan_fkey
    FOREIGN KEY (plan) REFERENCES plans (name) ON UPDATE RESTRICT ON DELETE RESTRICT;
CREATE INDEX tenants_plan_idx ON tenants (plan) WHERE status <> 'deleted';

-- Trials: a tenant with `expires_at` is suspended by the scheduler once it
-- passes (`expired_at` records that it was; a plan change clears both and
-- resumes a tenant its expiry suspended).
ALTER TABLE tenants ADD COLUMN expires_at timestamptz;
ALTER TABLE tenants ADD COLUMN expired_at timestamptz;
CREATE INDEX tenants_expires_idx ON tenants (expires_at)
    WHERE expires_at IS NOT NULL AND expired_at IS NULL;

-- Free-form settings the app reads to gate features (size checked by silo).
ALTER TABLE tenants ADD COLUMN settings jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(settings) = 'object');

-- Storage quota: set by the usage collector when the tenant's database
-- grew past its plan's quota and its role was made read-only (privileges);
-- cleared when it is back under quota (or its plan grew) and write
-- privileges are granted again.
ALTER TABLE tenants ADD COLUMN over_quota_at timestamptz;

-- Read-only app credentials log in, behind the front door, as the
-- tenant's reader role (`silo_q_<hex>`, SELECT only), made with its first
-- read-only credential: its password, sealed like the tenant role's.
ALTER TABLE tenants ADD COLUMN reader_password_enc bytea;
ALTER TABLE tenants ADD COLUMN reader_key_id text;

-- Routers follow plan and settings changes too (a plan's own row change is
-- announced by silo as `plan:<name>` on the same channel).
DROP TRIGGER tenants_notify_changed ON tenants;
CREATE TRIGGER tenants_notify_changed
    AFTER UPDATE ON tenants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.password_enc IS DISTINCT FROM NEW.password_enc
          OR OLD.server_id IS DISTINCT FROM NEW.server_id
          OR OLD.database_name IS DISTINCT FROM NEW.database_name
          OR OLD.plan IS DISTINCT FROM NEW.plan
          OR OLD.frozen_at IS DISTINCT FROM NEW.frozen_at
          OR OLD.token_generation IS DISTINCT FROM NEW.token_generation
          OR OLD.settings IS DISTINCT FROM NEW.settings
          OR OLD.over_quota_at IS DISTINCT FROM NEW.over_quota_at
          OR OLD.reader_password_enc IS DISTINCT FROM NEW.reader_password_enc)
    EXECUTE FUNCTION silo_notify_tenant_changed();
