-- An admin key may be made to expire: from `expires_at` on, a request with
-- it is refused (401) as a revoked key's is, on every replica at once (the
-- check is in the lookup every request makes), and its console sessions
-- end. An expired key keeps its row and its name, and is listed with its
-- expiry, until it is revoked. NULL: the key does not expire.
ALTER TABLE admin_keys ADD COLUMN expires_at timestamptz;
