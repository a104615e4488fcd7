-- Which silo process ran (or runs) a backup: `host:pid`, for operators
-- following a backup across replicas.
ALTER TABLE backups ADD COLUMN runner text;
