-- Every change to a tenant row (status, credentials, server) is announced on
-- the `silo_tenants` channel with the tenant id, so every replica's router
-- drops its cached lookup and pool for that tenant at once.
CREATE FUNCTION silo_notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('silo_tenants', NEW.id::text);
    RETURN NEW;
END $$;

CREATE TRIGGER tenants_notify_changed
    AFTER UPDATE ON tenants
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.password_enc IS DISTINCT FROM NEW.password_enc
          OR OLD.server_id IS DISTINCT FROM NEW.server_id
          OR OLD.database_name IS DISTINCT FROM NEW.database_name
          OR OLD.plan IS DISTINCT FROM NEW.plan)
    EXECUTE FUNCTION silo_notify_tenant_changed();
