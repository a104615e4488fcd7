#![recursion_limit = "256"]
//! silo: a database-per-tenant control plane for PostgreSQL.
//!
//! - [`registry`]: the control database (the only code that writes it);
//! - [`provision`]: crash-safe creation, lifecycle and reconciliation of tenant
//!   databases and roles, with a warm pool of spare databases;
//! - [`migrate`]: the embedded control and tenant migrators;
//! - [`api`]: the admin REST API, health and metrics;
//! - [`jobs`]: background work (reconcile, warm pool), cancellable and joined;
//! - [`embedded`]: a private PostgreSQL for `silo dev` and the tests;
//! - [`cli`]: the `silo` commands.

pub mod api;
pub mod backup;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod embedded;
pub mod failpoint;
pub mod jobs;
pub mod migrate;
pub mod provision;
pub mod registry;
pub mod router;
pub mod telemetry;
pub mod tokens;
