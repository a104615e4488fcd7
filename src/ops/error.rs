//! The one error of the control plane's features: why a request was
//! refused (the client can act on it) or failed (silo logs it).
//!
//! There is no `From<sqlx::Error>`: a query's error arrives either as a
//! [`crate::registry::Error`] (it names the control database) or as a
//! [`crate::servers::Error`] (it names the tenant server and database), so
//! an operator is sent to the right database.

use uuid::Uuid;

use crate::domain::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named thing does not exist (`404`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request names something that does not fit (`422`).
    #[error("{0}")]
    Invalid(String),
    /// The request does not fit the current state (`409`).
    #[error("{0}")]
    Conflict(String),
    /// An operation in progress is in the way (`409`, naming it).
    #[error("{what}")]
    Busy { what: String, operation: Uuid },
    /// Backups were asked for, but no bucket is configured.
    #[error("backup storage is not configured (set SILO_S3_BUCKET)")]
    NotConfigured,
    /// Nothing is wrong with the request; try again later (`503`).
    #[error("{0}")]
    Unavailable(String),
    /// It failed; the chain says where.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Another operation on the tenant is running.
    pub fn busy(operation: Uuid) -> Self {
        Self::Busy {
            what: "another operation on this tenant is running".into(),
            operation,
        }
    }

    pub fn conflict(what: impl Into<String>) -> Self {
        Self::Conflict(what.into())
    }

    /// A tenant in the wrong state: `tenant is <status>: <what would work>`.
    pub fn state(status: &str, expected: &str) -> Self {
        Self::Conflict(format!("tenant is {status}: {expected}"))
    }

    /// The message to record (an internal error with its whole cause chain).
    pub fn detail(&self) -> String {
        match self {
            Self::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        }
    }
}

impl From<crate::registry::Error> for Error {
    fn from(e: crate::registry::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<crate::servers::Error> for Error {
    fn from(e: crate::servers::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Self::Invalid(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_query_names_the_database_it_failed_in() {
        let control = Error::from(crate::registry::Error::from(sqlx::Error::PoolTimedOut));
        assert!(
            control.detail().contains("control database"),
            "{}",
            control.detail()
        );
        let tenant = Error::from(crate::servers::Error {
            server: "eu-2".into(),
            database: Some("silo_t_1".into()),
            role: None,
            source: sqlx::Error::PoolTimedOut,
        });
        let detail = tenant.detail();
        assert!(
            detail.contains("tenant server 'eu-2', database silo_t_1"),
            "{detail}"
        );
        assert!(!detail.contains("control database"), "{detail}");
    }
}
