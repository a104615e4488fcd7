//! Failpoints for crash tests: `SILO_FAILPOINT=<name>` makes the process abort
//! (no unwinding, no cleanup, like a kill -9) when it reaches that point.
//! Unset in production, where [`hit`] is one cached string comparison.

use std::sync::OnceLock;

/// Name of the environment variable naming the failpoint to abort at.
pub const ENV: &str = "SILO_FAILPOINT";

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Abort the process here if `SILO_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
