-- Admin console sessions (issue 17), in the control database so that every
-- replica knows them: a browser signed in through one replica is signed in
-- on all, and signing out (or the key's revocation) ends it everywhere.
-- Nothing secret is stored: the session is found by the SHA-256 of its
-- cookie; who signed in is the SHA-256 of the token they signed in with
-- (a named key's `admin_keys.token_hash`, looked up again on every request,
-- or the bootstrap token's, compared with the running SILO_ADMIN_TOKEN);
-- the form (CSRF) token is derived from the cookie, never stored.
CREATE TABLE console_sessions (
    id_hash     bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    kind        text NOT NULL CHECK (kind IN ('bootstrap', 'key')),
    token_hash  bytea NOT NULL CHECK (length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_sessions_expiry_idx ON console_sessions (expires_at);
