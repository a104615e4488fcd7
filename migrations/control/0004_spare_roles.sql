-- A spare now comes with its own login role, created, granted and verified
-- when the spare is cloned, so taking a spare is one rename of both. Spares
-- from before have no role; the sweep replaces them.
ALTER TABLE spares ADD COLUMN role_name text;
ALTER TABLE spares ADD COLUMN password_enc bytea;
ALTER TABLE spares ADD COLUMN key_id text;
