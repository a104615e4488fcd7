-- Master-key rotation (`silo master-key rotate`) re-seals stored credentials
-- under a new key: the ciphertext changes, the password does not, so no
-- router has a stale pool. The re-sealing session sets `silo.resealing`, and
-- its updates are not announced on `silo_tenants` (else every replica would
-- drop every tenant's pool during a rotation). Every other session's changes
-- are announced as before; the trigger's WHEN clause is unchanged.
CREATE OR REPLACE FUNCTION silo_notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('silo.resealing', true) = 'on' THEN
        RETURN NEW;
    END IF;
    PERFORM pg_notify('silo_tenants', NEW.id::text);
    RETURN NEW;
END $$;
