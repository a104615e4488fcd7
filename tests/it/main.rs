//! silo's integration tests: one binary (one link of silo and its SDKs),
//! one module per area. Every test starts its own private PostgreSQL
//! cluster (and S3 store, where it backs up); nothing is mocked.

#![allow(dead_code)] // each area uses its own part of the harness

mod common;

mod admin_api;
mod admin_keys;
mod app_api;
mod app_credentials;
mod architecture;
mod backup;
mod bounded;
mod cli;
mod console;
mod crash;
mod fleet;
mod helm;
mod isolation;
mod master_key;
mod nothing_lost;
mod openapi;
mod outage;
mod plans;
mod reconcile;
mod relocate;
mod replicas;
mod rotation;
mod router;
mod router_heal;
mod servers;
mod usage;
mod wire;
mod wire_drivers;
mod wire_readers;
mod wire_shared;
