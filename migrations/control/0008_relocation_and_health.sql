-- Relocation: while a tenant is cut over to another server its writes are
-- frozen (`frozen_at` set); routers answer 503 with Retry-After meanwhile.
ALTER TABLE tenants ADD COLUMN frozen_at timestamptz;

-- Routers follow freezes too.
DROP TRIGGER tenants_notify_changed ON tenants;
CREATE TRIGGER tenants_notify_changed
    AFTER UPDATE ON tenants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.password_enc IS DISTINCT FROM NEW.password_enc
          OR OLD.server_id IS DISTINCT FROM NEW.server_id
          OR OLD.database_name IS DISTINCT FROM NEW.database_name
          OR OLD.plan IS DISTINCT FROM NEW.plan
          OR OLD.frozen_at IS DISTINCT FROM NEW.frozen_at)
    EXECUTE FUNCTION silo_notify_tenant_changed();

-- Server health checks: when a check last ran, when one last succeeded, and
-- the last failure. A server failing checks for long enough is `unhealthy`
-- (no new tenants) until a check succeeds again.
ALTER TABLE db_servers
    ADD COLUMN checked_at  timestamptz,
    ADD COLUMN last_ok_at  timestamptz,
    ADD COLUMN health_error text;
