-- Isolation enforced by PostgreSQL: a tenant database's data privileges
-- belong to that tenant's own role alone. Databases made before were granted
-- through one group role shared by every tenant; `own_privileges` is false
-- for them until the reconciler has regranted them (and for spares, which it
-- replaces).
ALTER TABLE tenants ADD COLUMN own_privileges boolean NOT NULL DEFAULT false;
ALTER TABLE spares ADD COLUMN own_privileges boolean NOT NULL DEFAULT false;

-- Revocable app tokens: a token carries the generation of its tenant it was
-- minted in; suspend, credential rotation and an explicit revoke start a new
-- one, and tokens of older generations are refused.
ALTER TABLE tenants ADD COLUMN token_generation integer NOT NULL DEFAULT 0;

-- Routers follow token generations too.
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
          OR OLD.token_generation IS DISTINCT FROM NEW.token_generation)
    EXECUTE FUNCTION silo_notify_tenant_changed();
