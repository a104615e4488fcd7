//! Self-contained infrastructure for `silo dev` and the tests.

pub mod postgres;
pub mod s3;

pub use postgres::{Durability, EmbeddedPostgres};
pub use s3::{EmbeddedS3, Faults};
