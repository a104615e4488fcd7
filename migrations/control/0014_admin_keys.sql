-- Named admin keys: bearer tokens for `/admin/v1` with a name and a role
-- (viewer, operator, admin), besides the bootstrap token SILO_ADMIN_TOKEN.
-- Only the SHA-256 of a token is stored (the token is shown once, when it
-- is made; see crypto::admin_key_hash for why one SHA-256 is enough). A
-- revoked key's row is kept, with `revoked_at`, for the audit trail; its
-- name may be reused by a new key.
CREATE TABLE admin_keys (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash   bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL,
    -- Written at most about once a minute per key, not on every request.
    last_used_at timestamptz,
    revoked_at   timestamptz,
    revoked_by   text
);
CREATE UNIQUE INDEX admin_keys_live_name ON admin_keys (name) WHERE revoked_at IS NULL;

-- The audit log names the key that acted in `actor` (`admin` is the
-- bootstrap token, as in every entry before this migration); `?key=` and
-- `?action=` filter on these.
CREATE INDEX audit_log_actor_idx ON audit_log (actor, id);
CREATE INDEX audit_log_action_idx ON audit_log (action, id);

-- The audit log is append-only, for silo's own login too (which owns the
-- table, so privileges alone would not hold it): every UPDATE, DELETE and
-- TRUNCATE is refused, whatever rows it would touch. Dropping the trigger
-- takes the table's owner, by hand, and is itself a schema change.
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
