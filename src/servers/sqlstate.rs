//! The SQLSTATEs silo tells apart, by name (PostgreSQL's appendix A), for
//! errors sqlx has no [`sqlx::error::ErrorKind`] for.

use std::borrow::Cow;

/// `23505`: a unique constraint said no.
pub const UNIQUE_VIOLATION: &str = "23505";
/// `28000`: the role may not log in (NOLOGIN, or pg_hba said no).
pub const INVALID_AUTHORIZATION: &str = "28000";
/// `28P01`: wrong password.
pub const INVALID_PASSWORD: &str = "28P01";
/// `2BP01`: objects (or privileges) still depend on what is being dropped.
pub const DEPENDENT_OBJECTS_STILL_EXIST: &str = "2BP01";
/// `3D000`: no such database.
pub const INVALID_CATALOG_NAME: &str = "3D000";
/// `42P04`: the database exists already.
pub const DUPLICATE_DATABASE: &str = "42P04";
/// `42710`: the role (or another object) exists already.
pub const DUPLICATE_OBJECT: &str = "42710";
/// `undefined_object`: e.g. a role that does not exist.
pub const UNDEFINED_OBJECT: &str = "42704";
/// A privilege is missing (a tenant over its storage quota writing).
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `53300`: too many connections (for the server, or for the role).
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// `55P03`: a lock was not granted in time (`lock_timeout`).
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// `57P03`: the server is starting up or shutting down.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// Class `57P`: the session was ended by an operator or a shutdown.
pub const CLASS_OPERATOR_INTERVENTION: &str = "57P";
/// Class `08`: the connection broke.
pub const CLASS_CONNECTION_EXCEPTION: &str = "08";

/// The SQLSTATE of a database error, if it is one.
pub fn of(e: &sqlx::Error) -> Option<Cow<'_, str>> {
    e.as_database_error().and_then(|d| d.code())
}

/// Did the database answer `e` with this SQLSTATE?
pub fn is(e: &sqlx::Error, code: &str) -> bool {
    of(e).as_deref() == Some(code)
}

/// The session is gone or going (ended by an operator, a shutdown, or a
/// broken connection): retry on another connection, not a bug.
pub fn is_disconnect(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_)
    ) || of(e).is_some_and(|c| {
        c.starts_with(CLASS_OPERATOR_INTERVENTION) || c.starts_with(CLASS_CONNECTION_EXCEPTION)
    })
}
