-- Nothing lost: which control plane this is, which cluster each server is,
-- and a credential rotation that survives a crash at any point.

-- The identity of this control plane, written (with the server's id) on
-- every tenant server's cluster it owns, and checked before anything is
-- dropped there. A control DB restored from a dump keeps its identity.
CREATE TABLE control_identity (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    control_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO control_identity DEFAULT VALUES;

-- The PostgreSQL cluster behind a server (`pg_control_system()` and the
-- port it listens on): one cluster is registered once, whatever its name
-- or host alias. Servers registered before are filled in by the reconciler.
ALTER TABLE db_servers
    ADD COLUMN system_identifier text,
    ADD COLUMN cluster_port integer;
CREATE UNIQUE INDEX db_servers_cluster_key ON db_servers (system_identifier, cluster_port);

-- A tenant password being rotated: stored (sealed) before the role's
-- password changes, promoted to `password_enc` after; whoever finds it set
-- (the router on a refused login, the reconciler) finishes the rotation.
ALTER TABLE tenants
    ADD COLUMN pending_password_enc bytea,
    ADD COLUMN pending_key_id text,
    ADD COLUMN pending_at timestamptz;
