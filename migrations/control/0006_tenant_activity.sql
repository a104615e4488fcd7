-- When app traffic last reached a tenant (flushed by routers about once a
-- minute); scheduled archival picks tenants idle longer than configured.
ALTER TABLE tenants ADD COLUMN last_active_at timestamptz;
CREATE INDEX tenants_idle_idx ON tenants (coalesce(last_active_at, created_at)) WHERE status = 'active';
