-- Usage metering: what each tenant uses, read by the usage collector (one
-- replica at a time) from its server's statistics, and counted by every
-- replica's router (app requests and errors).

-- Current usage, one row per tenant. The counters are silo's own running
-- totals: each pass adds what PostgreSQL's counters grew by since the
-- previous pass (`raw_*`, read from pg_stat_database), so a statistics
-- reset or a move to another server (counters going down, or another
-- database) never makes them go backwards.
CREATE TABLE tenant_usage (
    tenant_id        uuid PRIMARY KEY REFERENCES tenants (id),
    sampled_at       timestamptz,
    size_bytes       bigint,
    connections      integer,
    commits          bigint NOT NULL DEFAULT 0,
    rollbacks        bigint NOT NULL DEFAULT 0,
    rows_written     bigint NOT NULL DEFAULT 0,
    -- Counted by the routers of every replica, added at each activity flush.
    requests         bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    -- What the last pass read, to take the next pass's differences from:
    -- the database (server and oid) and its raw counters.
    raw_server_id    uuid,
    raw_datid        bigint,
    raw_stats_reset  timestamptz,
    raw_commits      bigint,
    raw_rollbacks    bigint,
    raw_rows_written bigint
);
CREATE INDEX tenant_usage_size_idx ON tenant_usage (size_bytes DESC NULLS LAST);

-- One row per tenant and UTC day: the largest size and connections seen and
-- what the counters grew by that day. Kept SILO_USAGE_KEEP_DAYS days.
CREATE TABLE tenant_usage_daily (
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    day              date NOT NULL,
    max_size_bytes   bigint,
    max_connections  integer,
    commits          bigint NOT NULL DEFAULT 0,
    rollbacks        bigint NOT NULL DEFAULT 0,
    rows_written     bigint NOT NULL DEFAULT 0,
    requests         bigint NOT NULL DEFAULT 0,
    errors           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);
CREATE INDEX tenant_usage_daily_day_idx ON tenant_usage_daily (day, requests DESC);

-- The collector's claim: a replica runs a pass only if no pass started
-- within the interval (so replicas together run one pass per interval),
-- and holds an advisory lock while it runs (so two never overlap).
CREATE TABLE usage_collector (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    started_at  timestamptz,
    holder      text
);
INSERT INTO usage_collector (id) VALUES (true);

-- What each pass did (kept as long as the daily rollups).
CREATE TABLE usage_passes (
    id            bigserial PRIMARY KEY,
    holder        text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    servers       integer NOT NULL,
    tenants       integer NOT NULL,
    -- Queries sent to the busiest tenant server to read its statistics.
    max_server_queries integer NOT NULL,
    went_read_only integer NOT NULL,
    went_writable  integer NOT NULL,
    errors        integer NOT NULL
);
CREATE INDEX usage_passes_started_idx ON usage_passes (started_at);
