//! Self-contained infrastructure for `silo dev` and the tests.

pub mod postgres;

pub use postgres::{Durability, EmbeddedPostgres};
