//! Limits on every route, so no client can take the process down or
//! starve others: requests in flight, time per request, body size, and
//! each tenant's request rate. Every refusal is a problem+json answer
//! with `Retry-After`.
//!
//! | routes | in flight | time | body | rate |
//! |---|---|---|---|---|
//! | `/api/v1` | `SILO_APP_MAX_IN_FLIGHT` | `SILO_APP_REQUEST_TIMEOUT` | `SILO_APP_MAX_BODY_BYTES` | `SILO_APP_RATE_LIMIT` and `SILO_APP_MISDIRECTED_LIMIT` per tenant |
//! | `/admin/v1` | `SILO_ADMIN_MAX_IN_FLIGHT` | `SILO_ADMIN_REQUEST_TIMEOUT` | 2 MiB | — |
//! | health, metrics, the document | [`OTHER_MAX_IN_FLIGHT`] | [`OTHER_REQUEST_TIMEOUT`] | 2 MiB | — |
//!
//! An app request that runs out of time is answered 503 at once, but its
//! handler runs on to its end in a task of its own (bounded by the
//! statement timeout): a query is never abandoned mid-way, so its tenant
//! connection goes back to the pool clean. The in-flight slot is held until
//! the handler really ends, so requests that timed out still count.
//!
//! A `429` to a tenant over its rate is held (outside the in-flight limit
//! and the deadline) until the tenant may send again, at most
//! `SILO_APP_REFUSAL_HOLD_MS`: a client that retries at once, or a flood
//! from a few connections, is slowed to the tenant's rate instead of
//! taking the cores from other tenants with refusals. At most
//! [`HttpLimits::app_refusal_holds_per_tenant`] of a tenant's and
//! [`HOLDS_TOTAL`] in all are held;
//! past them a refusal is sent at once.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;
use crate::wire::address_key;

/// Health, metrics and the document: requests in flight at once.
pub const OTHER_MAX_IN_FLIGHT: usize = 64;
/// Health, metrics and the document: longest a request may take.
pub const OTHER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits of the HTTP routes (from `silo serve`'s settings).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest an app request may take before it is answered 503.
    pub app_request_timeout: Duration,
    /// App requests in flight at once; more are answered 503 at once.
    pub app_max_in_flight: usize,
    /// Largest app request body.
    pub app_max_body_bytes: usize,
    /// App requests per second per tenant (0: no limit).
    pub app_rate_limit: u32,
    /// App requests a tenant may send at once above its rate.
    pub app_rate_burst: u32,
    /// App requests per minute per tenant that name another tenant than
    /// the token's or carry a revoked token (0: no limit).
    pub app_misdirected_limit: u32,
    /// Longest a 429 to a tenant over a rate is held before it is sent.
    pub app_refusal_hold: Duration,
    /// A tenant's refusals held at once ([`HOLDS_PER_TENANT`]).
    pub app_refusal_holds_per_tenant: usize,
    /// Admin requests in flight at once; more are answered 503 at once.
    pub admin_max_in_flight: usize,
    /// Failed admin authentications one client address may make per
    /// minute (0: no limit).
    pub admin_auth_failures: u32,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            app_request_timeout: Duration::from_secs(
                crate::config::DEFAULT_APP_REQUEST_TIMEOUT_SECS,
            ),
            app_max_in_flight: crate::config::DEFAULT_APP_MAX_IN_FLIGHT,
            app_max_body_bytes: crate::config::DEFAULT_APP_MAX_BODY_BYTES,
            app_rate_limit: crate::config::DEFAULT_APP_RATE_LIMIT,
            app_rate_burst: crate::config::DEFAULT_APP_RATE_BURST,
            app_misdirected_limit: crate::config::DEFAULT_APP_MISDIRECTED_LIMIT,
            app_refusal_hold: Duration::from_millis(crate::config::DEFAULT_APP_REFUSAL_HOLD_MS),
            app_refusal_holds_per_tenant: HOLDS_PER_TENANT,
            admin_max_in_flight: crate::config::DEFAULT_ADMIN_MAX_IN_FLIGHT,
            admin_auth_failures: crate::config::DEFAULT_ADMIN_AUTH_FAILURES,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The limits at work: settings, in-flight counters, rate cells.
pub struct Limits {
    pub settings: HttpLimits,
    app: Arc<Semaphore>,
    admin: Arc<Semaphore>,
    other: Arc<Semaphore>,
    rate: RateLimiter<Uuid>,
    misdirected: RateLimiter<Uuid>,
    /// Refusals being held, in all and per tenant.
    held: Arc<Semaphore>,
    held_per_tenant: moka::sync::Cache<Uuid, Arc<Semaphore>>,
    auth_failures: RateLimiter<IpAddr>,
    /// Tokens being checked per client address: a few at once, so parallel
    /// guesses cannot all pass the allowance before the first is counted.
    auth_checks: moka::sync::Cache<IpAddr, Arc<Semaphore>>,
    /// SHA-256s of tokens that signed in on this process lately: looked up
    /// even from an address over its allowance, so the admins behind one
    /// address (a NAT, an unlisted proxy) keep working while a guesser
    /// among them is held back. A guess is never in it.
    recently_good: moka::sync::Cache<[u8; 32], ()>,
}

/// How long a token that signed in stays known to pass an address's
/// lockout, unused.
pub const RECENTLY_GOOD_FOR: Duration = Duration::from_secs(3600);

/// A tenant's refusals held at once by default; more are sent at once. A
/// held refusal costs a timer and its answer on top of the open connection
/// it waits on: what bounds them is how many connections the process takes.
pub const HOLDS_PER_TENANT: usize = 8192;
/// Refusals held at once in all.
pub const HOLDS_TOTAL: usize = 16_384;

/// Tokens of one client address checked at once; past the allowance at
/// most this many less one more are looked at (each is counted).
const AUTH_CHECKS_PER_ADDRESS: usize = 4;

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub fn new(settings: HttpLimits) -> Self {
        Self {
            app: Arc::new(Semaphore::new(settings.app_max_in_flight.max(1))),
            admin: Arc::new(Semaphore::new(settings.admin_max_in_flight.max(1))),
            other: Arc::new(Semaphore::new(OTHER_MAX_IN_FLIGHT)),
            rate: RateLimiter::new(),
            misdirected: RateLimiter::new(),
            held: Arc::new(Semaphore::new(HOLDS_TOTAL)),
            held_per_tenant: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            // Its cells go after 10 idle minutes, longer than any lockout
            // lasts: at most (allowance + AUTH_CHECKS_PER_ADDRESS) failures
            // ahead, 5 minutes at an allowance of 1 a minute.
            auth_failures: RateLimiter::new(),
            auth_checks: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            recently_good: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(RECENTLY_GOOD_FOR)
                .build(),
            settings,
        }
    }

    /// Count one app request of `tenant` against its rate (its plan's
    /// `plan_rate`, else `SILO_APP_RATE_LIMIT`): 429 when over it, to be
    /// held by [`app`] until the tenant may send again.
    pub fn admit(&self, tenant: Uuid, plan_rate: Option<i32>) -> Result<(), ApiError> {
        let (per_second, source) = match plan_rate {
            Some(r) => (r.max(1) as u32, "its plan's requests_per_second"),
            None if self.settings.app_rate_limit > 0 => {
                (self.settings.app_rate_limit, "SILO_APP_RATE_LIMIT")
            }
            None => return Ok(()),
        };
        let burst = self.settings.app_rate_burst.max(1);
        let interval = NANOS_PER_SECOND / u64::from(per_second.max(1));
        self.rate.check(tenant, interval, burst).map_err(|wait| {
            metrics::counter!("silo_app_rate_limited_total").increment(1);
            too_many(wait, Some(tenant), |seconds| {
                format!("the tenant sends more than {per_second} requests per second ({source}); retry after {seconds} s")
            })
        })
    }

    /// The answer to a request of `tenant`'s token that names another
    /// tenant or carries a revoked generation: `not_found` (the same as
    /// for an unknown tenant) within `SILO_APP_MISDIRECTED_LIMIT` a
    /// minute, 429 (held like a rate refusal) past it. A client never
    /// needs such requests; a token sending them names made-up tenants.
    pub fn misdirected(&self, tenant: Uuid, not_found: ApiError) -> ApiError {
        let per_minute = self.settings.app_misdirected_limit;
        if per_minute == 0 {
            return not_found;
        }
        let interval = 60 * NANOS_PER_SECOND / u64::from(per_minute);
        match self.misdirected.check(tenant, interval, per_minute) {
            Ok(()) => not_found,
            Err(wait) => {
                metrics::counter!("silo_app_misdirected_limited_total").increment(1);
                too_many(wait, Some(tenant), |seconds| {
                    format!("the token named a tenant other than its own (or was revoked) more than {per_minute} times a minute (SILO_APP_MISDIRECTED_LIMIT); retry after {seconds} s")
                })
            }
        }
    }

    /// Hold a refusal of `tenant` for `wait` (at most
    /// `SILO_APP_REFUSAL_HOLD_MS`), unless `app_refusal_holds_per_tenant`
    /// of its own or [`HOLDS_TOTAL`] in all are held already.
    /// Returns how long it was held.
    async fn hold(&self, tenant: Uuid, wait: Duration) -> Duration {
        let wait = wait.min(self.settings.app_refusal_hold);
        if wait.is_zero() {
            return Duration::ZERO;
        }
        let Ok(_all) = self.held.clone().try_acquire_owned() else {
            return Duration::ZERO;
        };
        let own = self.held_per_tenant.get_with(tenant, || {
            Arc::new(Semaphore::new(
                self.settings.app_refusal_holds_per_tenant.max(1),
            ))
        });
        let Ok(_own) = own.try_acquire_owned() else {
            return Duration::ZERO;
        };
        metrics::counter!("silo_app_refusals_held_total").increment(1);
        tokio::time::sleep(wait).await;
        wait
    }

    /// Whether the client at `peer` may try an admin key or the bootstrap
    /// token now: 429 once its failures used up the minute's allowance
    /// (`SILO_ADMIN_AUTH_FAILURES`), before any token is looked at, so a
    /// guesser learns nothing more until it refills. `None` (a request
    /// made in-process) is never limited.
    pub fn may_authenticate(&self, peer: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(peer), Some(interval)) = (peer, self.auth_failure_interval()) else {
            return Ok(());
        };
        let allowed = self.settings.admin_auth_failures;
        self.auth_failures
            .peek(address_key(peer), interval, allowed)
            .map_err(|wait| {
                metrics::counter!("silo_admin_auth_refused_total").increment(1);
                too_many(wait, None, |seconds| {
                    format!("too many failed sign-ins from this address (more than {allowed} a minute, SILO_ADMIN_AUTH_FAILURES); retry after {seconds} s")
                })
            })
    }

    /// Wait for a turn to check a token of `peer` (one of
    /// [`AUTH_CHECKS_PER_ADDRESS`]), then [`Self::may_authenticate`]: the
    /// turn is held while the token is looked at and its failure counted,
    /// so the allowance is read after the failures before it were counted.
    pub async fn authenticating(
        &self,
        peer: Option<IpAddr>,
    ) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some(address) = peer.filter(|_| self.auth_failure_interval().is_some()) else {
            return Ok(None);
        };
        // Refused at once when already over, without waiting for a turn.
        self.may_authenticate(peer)?;
        let turns = self.auth_checks.get_with(address_key(address), || {
            Arc::new(Semaphore::new(AUTH_CHECKS_PER_ADDRESS))
        });
        let turn = turns.acquire_owned().await.expect("never closed");
        self.may_authenticate(peer)?;
        Ok(Some(turn))
    }

    /// Whether the token hashing to `hash` signed in on this process
    /// within [`RECENTLY_GOOD_FOR`]: it is looked up whatever its
    /// address's allowance (it is no guess; a revoke still takes effect,
    /// the lookup says so).
    pub fn recently_good(&self, hash: &[u8; 32]) -> bool {
        self.recently_good.contains_key(hash)
    }

    /// Remember that the token hashing to `hash` signed in from `peer`
    /// (`true`), or forget it (`false`: it was refused). Requests made
    /// in-process (no peer) are neither limited nor remembered.
    pub fn signed_in(&self, peer: Option<IpAddr>, hash: [u8; 32], good: bool) {
        if !good {
            self.recently_good.invalidate(&hash);
        } else if peer.is_some() {
            self.recently_good.insert(hash, ());
        }
    }

    /// Count a failed admin authentication (a token that is neither a live
    /// admin key nor the bootstrap token) against `peer`.
    pub fn authentication_failed(&self, peer: Option<IpAddr>) {
        metrics::counter!("silo_admin_auth_failures_total").increment(1);
        let (Some(peer), Some(interval)) = (peer, self.auth_failure_interval()) else {
            return;
        };
        let allowed = self.settings.admin_auth_failures;
        // Charged even past the allowance: guesses that raced past
        // `may_authenticate` in parallel push the next try back each.
        if self
            .auth_failures
            .charge(address_key(peer), interval, allowed)
        {
            tracing::warn!(
                address = %address_key(peer),
                "failed admin sign-ins from this address are over SILO_ADMIN_AUTH_FAILURES a minute: its next attempts are answered 429"
            );
        }
    }

    /// Nanoseconds between failures at the allowed rate; `None` when off.
    fn auth_failure_interval(&self) -> Option<u64> {
        let per_minute = self.settings.admin_auth_failures;
        (per_minute > 0).then(|| 60 * NANOS_PER_SECOND / u64::from(per_minute))
    }
}

/// The client a request came from: the connection's address, or, when
/// that is a trusted proxy's, the nearest address in `X-Forwarded-For`
/// that is not a trusted proxy's (each proxy appends the address it saw;
/// what lies left of that was written by the client, and is ignored). A
/// header silo cannot read whole counts as none: the proxy's address.
pub fn client_address(peer: IpAddr, forwarded: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in forwarded.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for hop in value.split(',').map(str::trim) {
            let ip = hop
                .parse::<IpAddr>()
                .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()));
            match ip {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    let client = hops.iter().rev().find(|ip| !is_trusted(ip));
    // Every hop a proxy: the farthest one.
    client.or(hops.first()).copied().unwrap_or(peer)
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A 429 whose `Retry-After` is `wait` in whole seconds (rounded up, at
/// least 1), its detail written from those seconds; held by [`app`] when
/// it refuses `tenant` for its rate.
fn too_many(wait: Duration, tenant: Option<Uuid>, detail: impl FnOnce(u64) -> String) -> ApiError {
    let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let hold = tenant.map(|tenant| RefusalHold { tenant, wait });
    ApiError::TooManyRequests(detail(seconds), seconds, hold)
}

fn busy(what: &str, setting: &str) -> Response {
    metrics::counter!("silo_http_shed_total", "api" => what.to_owned()).increment(1);
    ApiError::Unavailable(format!(
        "silo is answering as many {what} requests as it may at once ({setting}); retry shortly"
    ))
    .into_response()
}

/// `/api/v1`: body size (by `Content-Length`; longer streamed bodies are
/// refused when read), requests in flight, and the request deadline, the
/// handler running on to its end in its own task.
pub async fn app(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &state.limits;
    let max_body = limits.settings.app_max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return ApiError::PayloadTooLarge(format!(
            "the body is larger than the limit of {max_body} bytes (SILO_APP_MAX_BODY_BYTES)"
        ))
        .into_response();
    }
    let Ok(slot) = limits.app.clone().try_acquire_owned() else {
        return busy("app", "SILO_APP_MAX_IN_FLIGHT");
    };
    let deadline = limits.settings.app_request_timeout;
    let span = tracing::Span::current();
    let handler = tokio::spawn(
        async move {
            let res = next.run(req).await;
            drop(slot);
            res
        }
        .instrument(span),
    );
    match tokio::time::timeout(deadline, handler).await {
        Ok(Ok(mut res)) => {
            if let Some(&RefusalHold { tenant, wait }) = res.extensions().get::<RefusalHold>() {
                let held = limits.hold(tenant, wait).await;
                if !held.is_zero() {
                    // What is left of the wait after the hold, in whole
                    // seconds up (0: send again now).
                    let left = wait.saturating_sub(held);
                    let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                    res.headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, seconds.into());
                }
            }
            res
        }
        Ok(Err(e)) => {
            ApiError::Internal(anyhow::anyhow!("run an app request: {e}")).into_response()
        }
        Err(_) => {
            metrics::counter!("silo_app_request_timeouts_total").increment(1);
            ApiError::Unavailable(format!(
                "the request took longer than {} s (SILO_APP_REQUEST_TIMEOUT); retry it",
                deadline.as_secs_f64()
            ))
            .into_response()
        }
    }
}

/// On a 429's response when it refuses a tenant for its rate: which
/// tenant, and how long until it may send again ([`app`] holds the answer).
#[derive(Debug, Clone, Copy)]
pub struct RefusalHold {
    tenant: Uuid,
    wait: Duration,
}

/// `/admin/v1`: requests in flight (its deadline is [`super::error::deadline`]).
pub async fn admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_slot) = state.limits.admin.clone().try_acquire_owned() else {
        return busy("admin", "SILO_ADMIN_MAX_IN_FLIGHT");
    };
    next.run(req).await
}

/// Health, metrics and the document: requests in flight, and a deadline.
pub async fn other(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Ok(_slot) = state.limits.other.clone().try_acquire_owned() else {
        return busy("health, metrics and document", "at most 64");
    };
    match tokio::time::timeout(OTHER_REQUEST_TIMEOUT, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {} s",
            OTHER_REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// Monotonic nanoseconds since the first call.
fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A rate per key, a tenant or a client address (GCRA: one atomic
/// "theoretical arrival time" per key, no lock, no timer). Each check says
/// the rate it applies, so a plan change applies at the next request.
struct RateLimiter<K> {
    cells: moka::sync::Cache<K, Arc<AtomicU64>>,
}

impl<K: Hash + Eq + Send + Sync + 'static> RateLimiter<K> {
    fn new() -> Self {
        Self {
            cells: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Count one event of `key`, or `Err(wait)` when it is over one per
    /// `interval` nanoseconds (with `burst` ahead of that).
    fn check(&self, key: K, interval: u64, burst: u32) -> Result<(), Duration> {
        // How far ahead of the sustained rate a key may be (its burst).
        let tolerance = interval * u64::from(burst.max(1));
        let cell = self.cells.get_with(key, || Arc::new(AtomicU64::new(0)));
        let now = now_nanos();
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + interval;
            if next - now > tolerance {
                return Err(Duration::from_nanos(next - now - tolerance));
            }
            match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Count one event of `key` whatever its rate; `true` when the next
    /// would be over one per `interval` nanoseconds (with `burst` ahead).
    fn charge(&self, key: K, interval: u64, burst: u32) -> bool {
        let tolerance = interval * u64::from(burst.max(1));
        let cell = self.cells.get_with(key, || Arc::new(AtomicU64::new(0)));
        let now = now_nanos();
        let tat = cell
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now) + interval)
            })
            .expect("the update always gives a value");
        tat.max(now) + 2 * interval - now > tolerance
    }

    /// What [`Self::check`] would answer now, counting nothing.
    fn peek(&self, key: K, interval: u64, burst: u32) -> Result<(), Duration> {
        let tolerance = interval * u64::from(burst.max(1));
        let Some(cell) = self.cells.get(&key) else {
            return Ok(());
        };
        let now = now_nanos();
        let next = cell.load(Ordering::Acquire).max(now) + interval;
        match next - now > tolerance {
            true => Err(Duration::from_nanos(next - now - tolerance)),
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let limiter = RateLimiter::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let tenth = NANOS_PER_SECOND / 10;
        let admitted = (0..20)
            .filter(|_| limiter.check(a, tenth, 5).is_ok())
            .count();
        // The burst (and at most one more as time passes during the loop).
        assert!((5..=6).contains(&admitted), "{admitted}");
        let wait = limiter.check(a, tenth, 5).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limiter.check(b, tenth, 5).is_ok(),
            "another tenant has its own rate"
        );
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(
            limiter.check(a, tenth, 5).is_ok(),
            "admitted again after the wait"
        );
    }

    #[test]
    fn behind_a_trusted_proxy_the_client_is_the_nearest_hop_no_proxy_wrote() {
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        let cases: &[(&str, &[&str], &str)] = &[
            // Not a trusted proxy: its own address, whatever it says.
            ("203.0.113.5", &["198.51.100.7"], "203.0.113.5"),
            // A trusted proxy: the address it appended.
            ("10.1.2.3", &["198.51.100.7"], "198.51.100.7"),
            // What the client wrote itself, left of that, is ignored.
            ("10.1.2.3", &["1.1.1.1, 198.51.100.7"], "198.51.100.7"),
            // Through two trusted proxies, in one header or two.
            (
                "10.1.2.3",
                &["6.6.6.6, 198.51.100.7, 192.0.2.1"],
                "198.51.100.7",
            ),
            (
                "10.1.2.3",
                &["6.6.6.6, 198.51.100.7", "10.9.9.9"],
                "198.51.100.7",
            ),
            // With a port (some proxies add one), and IPv6.
            ("10.1.2.3", &["198.51.100.7:4711"], "198.51.100.7"),
            ("10.1.2.3", &["2001:db8::1"], "2001:db8::1"),
            ("10.1.2.3", &["[2001:db8::1]:443"], "2001:db8::1"),
            // No header, or one silo cannot read whole: the proxy's own.
            ("10.1.2.3", &[], "10.1.2.3"),
            ("10.1.2.3", &["unknown"], "10.1.2.3"),
            ("10.1.2.3", &["198.51.100.7, junk"], "10.1.2.3"),
            ("10.1.2.3", &[""], "10.1.2.3"),
            // Every hop a trusted proxy: the farthest.
            ("10.1.2.3", &["10.0.0.7, 10.0.0.8"], "10.0.0.7"),
        ];
        for (peer, header, want) in cases {
            assert_eq!(
                client_address(ip(peer), &with(header), &trusted),
                ip(want),
                "{peer} with {header:?}"
            );
        }
        assert_eq!(
            client_address(ip("10.1.2.3"), &with(&["198.51.100.7"]), &[]),
            ip("10.1.2.3"),
            "no trusted proxy: never the header"
        );
    }

    #[test]
    fn failures_are_looked_at_without_counting_and_counted_past_the_allowance() {
        let limiter = RateLimiter::new();
        let address = IpAddr::from([192, 0, 2, 7]);
        let minute = 60 * NANOS_PER_SECOND;
        for _ in 0..10 {
            assert!(
                limiter.peek(address, minute, 3).is_ok(),
                "peeking counts nothing"
            );
        }
        assert!(!limiter.charge(address, minute, 3));
        assert!(!limiter.charge(address, minute, 3));
        assert!(limiter.charge(address, minute, 3), "the third uses it up");
        let wait = limiter.peek(address, minute, 3).unwrap_err();
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        // Failures that raced past the check still count: each pushes the
        // next try a further interval back.
        assert!(limiter.charge(address, minute, 3));
        let later = limiter.peek(address, minute, 3).unwrap_err();
        assert!(later > wait + Duration::from_secs(55), "{later:?}");
        assert!(limiter
            .peek(IpAddr::from([192, 0, 2, 8]), minute, 3)
            .is_ok());
    }
}
