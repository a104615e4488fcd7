//! Fleet migrations: every tenant database brought to the latest tenant
//! schema in parallel, resumably, with a result per tenant (see [`fleet`]).
//! The schema itself and how one database is migrated live in
//! [`crate::servers::schema`].

mod fleet;

pub use fleet::{
    Fleet, FleetOptions, FleetProgress, FleetReport, FleetRun, TenantOutcome, TenantResult,
    MAX_CONCURRENCY,
};
