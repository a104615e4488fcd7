-- Parameters an operation was started with, so a crashed run can be resumed as asked.
ALTER TABLE operations ADD COLUMN params jsonb NOT NULL DEFAULT '{}'::jsonb;

-- At most one fleet migration unfinished at a time, across all replicas: a
-- second start fails on this index and is told the running one's id.
CREATE UNIQUE INDEX operations_one_fleet_migration ON operations (kind)
    WHERE kind = 'migrate.tenants' AND status IN ('pending', 'running');
