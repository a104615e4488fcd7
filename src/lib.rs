#![recursion_limit = "256"]
//! silo: a database-per-tenant control plane for PostgreSQL.
//!
//! The modules, from the outside in (each imports only those below it):
//!
//! - [`cli`]: the `silo` commands; [`startup`]: how a process is put
//!   together (control plane, router, jobs, HTTP), for `serve`, `dev`, the
//!   tests and the benches alike;
//! - [`api`]: the admin REST API, the clinic app API, health, metrics and the
//!   OpenAPI document; [`jobs`]: background work (reconcile, warm pool, health
//!   checks, backup scheduler), cancellable and joined;
//! - [`control`]: the control plane, one handle over the features, owning
//!   what crosses them (delete with its final backup, restore into a new
//!   tenant, the reconciler);
//! - the features: [`provision`] (create, lifecycle, templates and spares),
//!   [`backup`] (backups, restores, verification, retention, archival),
//!   [`relocate`] (moves between servers), [`migrate`] (fleet migrations),
//!   [`rekey`] (master-key rotation: re-sealing stored secrets), [`usage`]
//!   (usage metering and storage quotas enforced by privileges);
//! - shared machinery: [`servers`] (admin access to tenant servers: roles,
//!   sessions, names, the tenant schema, pg tools, SQLSTATEs, health) and
//!   [`ops`] (the operations runner, its kinds and exclusions, the one
//!   error type of the features);
//! - [`wire`]: the PostgreSQL-protocol front door (app credentials, SCRAM,
//!   session and transaction pooling on the router's budgets);
//! - [`router`]: per-tenant connection pools under each server's budget (it
//!   uses the registry and server access only, never a feature);
//! - [`registry`]: the control database, the only code that writes it;
//! - foundations: [`domain`] (typed values checked at every entry point),
//!   [`config`], [`crypto`], [`tokens`], [`telemetry`], [`failpoint`], and
//!   [`embedded`] (a private PostgreSQL and S3 store for `silo dev` and the
//!   tests).

pub mod api;
pub mod backup;
pub mod cli;
pub mod config;
pub mod control;
pub mod crypto;
pub mod domain;
pub mod embedded;
pub mod failpoint;
pub mod jobs;
pub mod migrate;
pub mod ops;
pub mod provision;
pub mod registry;
pub mod rekey;
pub mod relocate;
pub mod router;
pub mod servers;
pub mod startup;
pub mod telemetry;
pub mod tokens;
pub mod usage;
pub mod wire;

/// jemalloc, not glibc's malloc. glibc took about a tenth of all CPU time
/// of an app request end to end (its arena locks and `malloc_consolidate`,
/// with memory freed on another runtime thread than the one that allocated
/// it); with jemalloc silo's app API served about 30 % more requests per
/// second, and 10,000 idle front-door clients take no more memory (80.1
/// against 81.1 MiB; docs/benchmarks.md, phase 4 and "10,000 idle
/// clients"). Set here, in the library, so every process silo runs in (the
/// `silo` binary, the tests, the benches) allocates the same way.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
