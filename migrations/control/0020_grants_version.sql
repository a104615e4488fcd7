-- Which grants code made a tenant database's (or a spare's) privileges.
-- 0019 marked every live database for a regrant, but during a rolling
-- upgrade a replica still on the older code could regrant one with the old
-- grants (server-side lo_import included) and mark it done, or make a spare
-- (and tenants from it) with them. The older code knows nothing of
-- `grants_version`, so what it writes is at version 0, and a row below
-- version 1 is never "granted as today's code grants": its `own_privileges`
-- stays false, and a current replica regrants (or replaces) it.
ALTER TABLE tenants ADD COLUMN grants_version integer NOT NULL DEFAULT 0;
ALTER TABLE spares ADD COLUMN grants_version integer NOT NULL DEFAULT 0;

CREATE FUNCTION silo_grants_current() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.grants_version < 1 THEN
        NEW.own_privileges := false;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER tenants_grants_current
    BEFORE INSERT OR UPDATE OF own_privileges, grants_version ON tenants
    FOR EACH ROW EXECUTE FUNCTION silo_grants_current();
CREATE TRIGGER spares_grants_current
    BEFORE INSERT OR UPDATE OF own_privileges, grants_version ON spares
    FOR EACH ROW EXECUTE FUNCTION silo_grants_current();

-- Everything regranted (or replaced) by a replica on this code.
UPDATE tenants SET own_privileges = false WHERE status IN ('active', 'suspended');
UPDATE spares SET own_privileges = false;
