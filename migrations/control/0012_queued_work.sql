-- Bounded background work: backups, verifies, restores, archivals and moves
-- share SILO_BACKUP_CONCURRENCY slots per silo process. Work waiting for a
-- slot is `queued`, and names the process that queued it (`queued_by`): that
-- process holds an advisory lock on this id while it lives, so a sweep can
-- tell queued work whose process died from work still waiting.

ALTER TABLE operations DROP CONSTRAINT operations_status_check;
ALTER TABLE operations ADD CONSTRAINT operations_status_check
    CHECK (status IN ('queued', 'pending', 'running', 'succeeded', 'failed'));
ALTER TABLE operations ADD COLUMN queued_by uuid;
DROP INDEX operations_open_idx;
CREATE INDEX operations_open_idx ON operations (status)
    WHERE status IN ('queued', 'pending', 'running');

ALTER TABLE backups DROP CONSTRAINT backups_status_check;
ALTER TABLE backups ADD CONSTRAINT backups_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'deleted'));
ALTER TABLE backups ADD COLUMN queued_by uuid;

-- One backup of a tenant queued or running at a time.
DROP INDEX backups_one_running;
CREATE UNIQUE INDEX backups_one_running ON backups (tenant_id)
    WHERE status IN ('queued', 'running');
-- A scheduled slot is claimed once; a failed attempt frees it for a retry.
DROP INDEX backups_one_per_slot;
CREATE UNIQUE INDEX backups_one_per_slot ON backups (tenant_id, scheduled_for)
    WHERE scheduled_for IS NOT NULL AND status IN ('queued', 'running', 'succeeded');
DROP INDEX backups_open_idx;
CREATE INDEX backups_open_idx ON backups (status) WHERE status IN ('queued', 'running');
