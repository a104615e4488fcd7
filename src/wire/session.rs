//! One client of the front door: its startup (TLS, tenant, SCRAM), then
//! the forwarding loop, in session or transaction pooling.
//!
//! In transaction mode a client holds a server connection from its first
//! message until the server is idle again (`ReadyForQuery` `I`, with no
//! `Sync` outstanding and no half-sent extended-protocol batch). Named
//! prepared statements are renamed to a name derived from their text and
//! prepared on whichever server connection the client gets (a `Parse` is
//! slipped in before a `Bind`/`Describe` that needs it, and its
//! `ParseComplete` is kept from the client).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::FramedRead;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::mux;
use super::pool::{Checkout, CheckoutError};
use super::proto::{self, Codec, Msg};
use super::scram::{Channel, Exchange, Failure, Verifier};
use super::spin::{self, Side, Spinning};
use super::{CancelSlot, Ender, Io, Shared, TenantCounters};
use crate::domain::PoolMode;
use crate::router::{AcquireError, RouteError, TenantRouter};

/// Parameters a client may set at startup that silo keeps in step on the
/// server connection it gets (reported ones, so their value is known
/// without asking). `application_name` follows in session mode only.
pub(super) const TRACKED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
];

/// Server messages larger than this are written to the client directly.
const DIRECT_WRITE: usize = 64 * 1024;

/// How long a session that ends with an error waits for its client to
/// take the message.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// A client's read buffer to start with.
const CLIENT_BUFFER: usize = 1024;

type Reader = FramedRead<ReadHalf<Box<dyn Io>>, Codec>;

/// Serve one client connection until it ends.
///
/// A client that logs in is served by a task of its own spawned on
/// `sessions`, holding only its session: a task is as large as its largest
/// state, and this function's states (the login, a moved-from session the
/// compiler keeps room for) would otherwise stay with each of 10,000 idle
/// clients (see docs/benchmarks.md).
pub(super) async fn handle(shared: Arc<Shared>, tcp: TcpStream, sessions: TaskTracker) {
    let _ = tcp.set_nodelay(true);
    let Ok(peer) = tcp.peer_addr() else { return };
    let mut io: Box<dyn Io> = Box::new(Spinning::new(tcp, Side::Client));
    // Connections not logged in yet have slots of their own: a flood of
    // silent connections cannot take the logged-in clients' room; and one
    // address may hold only its share of them, so a flood from one
    // address cannot hold back the logins of others.
    let Some(from_address) = shared
        .logins
        .enter(peer.ip(), shared.settings.max_logins_per_address)
    else {
        let why = "too many connections from this address are logging in, retry shortly";
        return too_many(&mut io, "too_many_logins_from_address", why).await;
    };
    let Ok(starting) = shared.startups.clone().try_acquire_owned() else {
        let why = "too many connections are logging in, retry shortly";
        return too_many(&mut io, "too_many_logins", why).await;
    };
    let limit = shared.settings.startup_timeout;
    // Boxed, as are the other one-off steps (attach, detach, the ending): a
    // task is as large as its largest state, and an idle client's task
    // should hold its session only (10,000 idle clients, see docs/benchmarks.md).
    let started = tokio::time::timeout(limit, Box::pin(startup(&shared, io))).await;
    drop((starting, from_address));
    let mut session = match started {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(_) => {
            metrics::counter!("silo_wire_refused_total", "reason" => "startup_timeout")
                .increment(1);
            return;
        }
    };
    let Ok(client) = shared.clients.clone().try_acquire_owned() else {
        metrics::counter!("silo_wire_refused_total", "reason" => "too_many_clients").increment(1);
        Box::pin(session.fail("53300", "sorry, too many clients already")).await;
        return;
    };
    sessions.spawn(session.run(client));
}

/// Refuse a connection before its login for want of room (`53300`).
async fn too_many(io: &mut Box<dyn Io>, reason: &'static str, message: &str) {
    metrics::counter!("silo_wire_refused_total", "reason" => reason).increment(1);
    let _ = io
        .write_all(&proto::error_frame("FATAL", "53300", message))
        .await;
}

/// Read the untyped first packet: (code, rest). A length no startup packet
/// has is refused with `08P01` (the client may not speak PostgreSQL at
/// all, but an error it can show beats a bare reset).
async fn first_packet(io: &mut Box<dyn Io>) -> Option<(i32, Vec<u8>)> {
    let len = io.read_i32().await.ok()?;
    if !(8..=proto::MAX_STARTUP_PACKET as i32).contains(&len) {
        metrics::counter!("silo_wire_refused_total", "reason" => "malformed").increment(1);
        refuse(io, "08P01", "invalid length of startup packet").await;
        return None;
    }
    let mut body = vec![0u8; len as usize - 4];
    io.read_exact(&mut body).await.ok()?;
    spin::note_activity();
    let code = i32::from_be_bytes(body[..4].try_into().ok()?);
    Some((code, body[4..].to_vec()))
}

/// Read one typed message during startup (small ones only).
async fn startup_message(io: &mut Box<dyn Io>) -> Option<(u8, Vec<u8>)> {
    let tag = io.read_u8().await.ok()?;
    let len = io.read_i32().await.ok()?;
    if !(4..=proto::MAX_STARTUP_PACKET as i32).contains(&len) {
        return None;
    }
    let mut body = vec![0u8; len as usize - 4];
    io.read_exact(&mut body).await.ok()?;
    spin::note_activity();
    Some((tag, body))
}

async fn refuse(io: &mut Box<dyn Io>, code: &str, message: &str) {
    let _ = io
        .write_all(&proto::error_frame("FATAL", code, message))
        .await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

/// TLS, the startup packet, the tenant and the login; `None` when the
/// client was refused (and told why) or went away.
async fn startup(shared: &Arc<Shared>, mut io: Box<dyn Io>) -> Option<Session> {
    let mut tls_name: Option<String> = None;
    let mut encrypted = false;
    let (params, _minor) = loop {
        let (code, body) = first_packet(&mut io).await?;
        match code {
            proto::SSL_REQUEST if !encrypted => match &shared.tls {
                Some(acceptor) => {
                    io.write_all(b"S").await.ok()?;
                    let tls = acceptor.accept(io).await.ok()?;
                    tls_name = tls.get_ref().1.server_name().map(str::to_owned);
                    io = Box::new(tls);
                    encrypted = true;
                }
                None => io.write_all(b"N").await.ok()?,
            },
            proto::GSSENC_REQUEST if !encrypted => io.write_all(b"N").await.ok()?,
            proto::CANCEL_REQUEST => {
                let mut b = &body[..];
                if let (Some(pid), Some(key)) = (proto::get_i32(&mut b), proto::get_i32(&mut b)) {
                    cancel(shared, pid, key).await;
                }
                return None;
            }
            v if v >> 16 == 3 => {
                let Some(params) = proto::startup_params(&body) else {
                    refuse(&mut io, "08P01", "invalid startup packet layout").await;
                    return None;
                };
                break (params, v & 0xffff);
            }
            v => {
                refuse(
                    &mut io,
                    "0A000",
                    &format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0",
                        v >> 16,
                        v & 0xffff
                    ),
                )
                .await;
                return None;
            }
        }
    };
    // Protocol 3.x with x > 0, or `_pq_.` options: say what is spoken.
    let unknown: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if _minor > 0 || !unknown.is_empty() {
        let mut out = BytesMut::new();
        out.extend_from_slice(b"v");
        let mut body = Vec::new();
        body.extend_from_slice(&0i32.to_be_bytes());
        body.extend_from_slice(&(unknown.len() as i32).to_be_bytes());
        for k in &unknown {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
        }
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&body);
        io.write_all(&out).await.ok()?;
    }
    if shared.settings.require_tls && !encrypted {
        refuse(
            &mut io,
            "28000",
            "this server requires TLS (sslmode=require)",
        )
        .await;
        return None;
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user") else {
        refuse(
            &mut io,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
    };
    let from_host = tls_name
        .as_deref()
        .and_then(|h| tenant_of_host(h, shared.app_domain.as_deref()));
    let tenant_name = match (get("database"), from_host) {
        (Some(db), Some(host)) if db != host && db != user => {
            refuse(
                &mut io,
                "28000",
                "the database named and the TLS server name name different tenants",
            )
            .await;
            return None;
        }
        (_, Some(host)) => host,
        (Some(db), None) => db,
        (None, None) => user.clone(),
    };
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        refuse(
            &mut io,
            "0A000",
            "replication connections are not supported",
        )
        .await;
        return None;
    }
    // Who: the tenant and its credential (or a decoy, so an unknown tenant
    // or user looks like a wrong password). Slugs are lower case, so any
    // spelling of one names it (and gets the same salt, known or not).
    let tenant_name = tenant_name.to_ascii_lowercase();
    let entry = match shared.router.resolve(&tenant_name).await {
        Ok(e) if !matches!(e.status, crate::registry::TenantStatus::Deleted) => Some(e),
        Ok(_) | Err(RouteError::NotFound) => None,
        Err(e) => {
            refuse(
                &mut io,
                "57P03",
                &format!(
                    "the tenant cannot be looked up now, retry shortly ({})",
                    short(&e)
                ),
            )
            .await;
            return None;
        }
    };
    let credential = match &entry {
        Some(e) => match shared.credentials_of(e.id).await {
            Ok(list) => list.iter().find(|c| c.name == user).cloned(),
            Err(_) => {
                refuse(
                    &mut io,
                    "57P03",
                    "the control database is unreachable, retry shortly",
                )
                .await;
                return None;
            }
        },
        None => None,
    };
    let verifier = credential
        .as_ref()
        .and_then(|c| Verifier::parse(&c.verifier))
        .unwrap_or_else(|| {
            // Seeded by the tenant as it is, not as it was spelt (slug or
            // id in any case), so every spelling gets one salt, as a real
            // credential would.
            let tenant = match &entry {
                Some(e) => e.id.to_string(),
                None => uuid::Uuid::parse_str(&tenant_name)
                    .map(|u| u.to_string())
                    .unwrap_or_else(|_| tenant_name.to_ascii_lowercase()),
            };
            Verifier::decoy(&shared.decoy, &format!("{tenant}/{user}"))
        });
    let channel = match (&shared.tls_end_point, encrypted) {
        (Some(end_point), true) => Channel::Tls(end_point),
        _ => Channel::Plain,
    };
    if !authenticate(&mut io, verifier, channel, &user).await {
        metrics::counter!("silo_wire_refused_total", "reason" => "authentication").increment(1);
        return None;
    }
    let (Some(entry), Some(credential)) = (entry, credential) else {
        // Unreachable in practice: a decoy never matches.
        refuse(
            &mut io,
            "28P01",
            &format!("password authentication failed for user \"{user}\""),
        )
        .await;
        return None;
    };
    // Logged in. Is the tenant open, and is there room?
    match TenantRouter::check_status(&entry) {
        Ok(()) | Err(RouteError::NotReady("moving")) => {}
        Err(e) => {
            let Fatal(code, message) = route_fatal(&entry.slug, &e);
            refuse(&mut io, code, &message).await;
            return None;
        }
    }
    let counters = shared
        .tenants
        .lock()
        .expect("tenants lock")
        .entry(entry.id)
        .or_default()
        .clone();
    // Its plan's client limit, else silo's setting (per replica).
    let limit = entry
        .limits
        .wire_clients
        .map_or(shared.settings.max_clients_per_tenant, |n| {
            n.max(1) as usize
        });
    let room = counters
        .clients
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok();
    if !room {
        metrics::counter!("silo_wire_refused_total", "reason" => "tenant_clients").increment(1);
        refuse(
            &mut io,
            "53300",
            &format!(
                "too many connections for tenant \"{}\" (its plan allows {limit})",
                entry.slug
            ),
        )
        .await;
        return None;
    }
    let tenant_slot = TenantSlot {
        shared: shared.clone(),
        tenant: entry.id,
        counters: counters.clone(),
    };
    let wanted = wanted_settings(&params);
    let (read, write) = tokio::io::split(io);
    let ender = Arc::new(Ender {
        token: shared.stopping.child_token(),
        reason: Default::default(),
        credential: credential.id,
    });
    let session_id = shared.register_session(entry.id, ender.clone());
    let (key, slot) = shared.new_cancel_key();
    let mut s = Session {
        shared: shared.clone(),
        mode: credential.pool_mode,
        read_only: credential.read_only,
        tenant: entry.id,
        slug: entry.slug.clone(),
        reader: FramedRead::with_capacity(
            read,
            Codec::client(shared.settings.max_message_bytes),
            // Small while idle (10,000 idle clients), grown by what arrives.
            CLIENT_BUFFER,
        ),
        writer: write,
        out: BytesMut::new(),
        server: None,
        pool: None,
        transactions: metrics::counter!("silo_wire_transactions_total"),
        wait_seconds: metrics::histogram!("silo_wire_wait_seconds"),
        errors: metrics::counter!("silo_wire_errors_total"),
        wanted,
        statements: HashMap::new(),
        prepared_bytes: 0,
        statement_seq: 0,
        answered_seq: 0,
        sent_syncs: 0,
        done_syncs: 0,
        in_batch: false,
        parses: VecDeque::new(),
        closes: VecDeque::new(),
        pending: HashMap::new(),
        unnamed: None,
        unnamed_here: false,
        bound: false,
        copy_in: false,
        torn: false,
        dirty: false,
        status: b'I',
        ender,
        session_id,
        cancel_key: key,
        cancel_slot: slot,
        tenant_slot,
    };
    // Transaction mode, and the tenant's pool knows the server's parameters
    // from a connection it made: the client logs in without a server
    // connection (its first transaction gets one, with its settings).
    // Otherwise a server connection now: the tenant's database is
    // reachable, the client's settings are applied, and the client hears
    // the server's parameters; transaction mode gives it back at once.
    let known = match s.mode {
        PoolMode::Transaction => match shared.pool_for(&entry, s.read_only).await {
            Ok(pool) => pool.initial_params().map(|p| (pool, p)),
            Err(_) => None,
        },
        PoolMode::Session => None,
    };
    let params = match known {
        Some((pool, params)) => {
            s.pool = Some(pool);
            params
        }
        None => {
            if let Err(why) = Box::pin(s.attach()).await {
                s.fail(why.0, &why.1).await;
                return None;
            }
            s.server.as_mut().expect("attached").conn().initial.clone()
        }
    };
    // What the client's sessions will have: the server's own values at
    // login, with the client's settings on top.
    let mut out = BytesMut::new();
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    for k in names {
        let v = s
            .wanted
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
            .unwrap_or(&params[k]);
        proto::parameter_status(&mut out, k, v);
    }
    proto::backend_key_data(&mut out, key.0, key.1);
    proto::ready_for_query(&mut out, b'I');
    if s.mode == PoolMode::Transaction && s.server.is_some() {
        Box::pin(s.detach()).await;
    }
    if s.writer.write_all(&out).await.is_err() {
        return None;
    }
    metrics::counter!("silo_wire_logins_total").increment(1);
    Some(s)
}

/// The SCRAM exchange; `false` (the client told) when it failed.
async fn authenticate(
    io: &mut Box<dyn Io>,
    verifier: Verifier,
    channel: Channel<'_>,
    user: &str,
) -> bool {
    let failed = format!("password authentication failed for user \"{user}\"");
    let mut out = BytesMut::new();
    proto::auth(&mut out, 10, channel.mechanisms().as_bytes());
    if io.write_all(&out).await.is_err() {
        return false;
    }
    let Some(body) = sasl_response(io).await else {
        return false;
    };
    let Some((mechanism, mut rest)) = proto::split_cstr(&body) else {
        refuse(io, "08P01", "malformed SASL message").await;
        return false;
    };
    let Some(len) = proto::get_i32(&mut rest) else {
        refuse(io, "08P01", "malformed SASL message").await;
        return false;
    };
    if len < 0 || len as usize != rest.len() {
        refuse(io, "08P01", "malformed SASL message").await;
        return false;
    }
    let (exchange, server_first) = match Exchange::start(verifier, channel, mechanism, rest) {
        Ok(started) => started,
        Err(Failure::Unsupported) => {
            refuse(io, "28000", "SASL authentication mechanism not supported").await;
            return false;
        }
        Err(Failure::Malformed(why)) => {
            refuse(io, "08P01", &format!("malformed SCRAM message: {why}")).await;
            return false;
        }
        Err(Failure::Mismatch) => {
            refuse(io, "28P01", &failed).await;
            return false;
        }
    };
    out.clear();
    proto::auth(&mut out, 11, server_first.as_bytes());
    if io.write_all(&out).await.is_err() {
        return false;
    }
    let Some(body) = sasl_response(io).await else {
        return false;
    };
    match exchange.finish(&body) {
        Ok(server_final) => {
            out.clear();
            proto::auth(&mut out, 12, server_final.as_bytes());
            proto::auth(&mut out, 0, b"");
            io.write_all(&out).await.is_ok()
        }
        Err(Failure::Malformed(why)) => {
            refuse(io, "08P01", &format!("malformed SCRAM message: {why}")).await;
            false
        }
        Err(_) => {
            refuse(io, "28P01", &failed).await;
            false
        }
    }
}

/// The client's next SASL message; `None` (the client told, as
/// PostgreSQL tells it, where it can be) for anything else.
async fn sasl_response(io: &mut Box<dyn Io>) -> Option<Vec<u8>> {
    match startup_message(io).await {
        Some((b'p', body)) => Some(body),
        Some((tag, _)) => {
            let message = format!("expected SASL response, got message type {tag}");
            refuse(io, "08P01", &message).await;
            None
        }
        None => {
            refuse(io, "08P01", "invalid SASL response").await;
            None
        }
    }
}

/// A TLS server name's tenant: its first label under `domain`.
fn tenant_of_host(host: &str, domain: Option<&str>) -> Option<String> {
    let domain = domain?;
    let host = host.to_ascii_lowercase();
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    (!label.is_empty() && !label.contains('.')).then(|| label.to_owned())
}

fn short(e: &RouteError) -> String {
    match e {
        RouteError::ControlDown(_) => "the control database is unreachable".into(),
        RouteError::Internal(_) => "internal error".into(),
        other => other.to_string(),
    }
}

async fn cancel(shared: &Shared, pid: i32, key: i32) {
    let slot = shared
        .cancels
        .lock()
        .expect("cancels lock")
        .get(&(pid, key))
        .cloned();
    let Some(slot) = slot else { return };
    if let Some((line, ticket, queued)) = slot.shared.lock().expect("cancel slot").as_ref() {
        metrics::counter!("silo_wire_cancels_total").increment(1);
        if !line.cancel(*ticket) {
            queued.notify_one();
        }
        return;
    }
    let server = slot.server.lock().expect("cancel slot").clone();
    if let Some((target, pid, secret)) = server {
        metrics::counter!("silo_wire_cancels_total").increment(1);
        if let Err(e) = target.cancel(pid, secret).await {
            tracing::debug!("failed to forward a cancel request: {e}");
        }
    }
}

impl Shared {
    fn new_cancel_key(&self) -> ((i32, i32), Arc<CancelSlot>) {
        use rand::Rng;
        let slot = Arc::new(CancelSlot::default());
        let mut map = self.cancels.lock().expect("cancels lock");
        loop {
            let key = (
                rand::thread_rng().gen_range(1..i32::MAX),
                rand::thread_rng().gen::<i32>(),
            );
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(slot.clone());
                return (key, slot);
            }
        }
    }
}

/// A client counted in its tenant's figures, until dropped.
struct TenantSlot {
    shared: Arc<Shared>,
    tenant: Uuid,
    counters: Arc<TenantCounters>,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut all = self.shared.tenants.lock().expect("tenants lock");
        if self.counters.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client: forget the tenant's figures (unless a new
            // client counted itself in meanwhile).
            if all.get(&self.tenant).is_some_and(|c| {
                Arc::ptr_eq(c, &self.counters) && c.clients.load(Ordering::Acquire) == 0
            }) {
                all.remove(&self.tenant);
            }
        }
    }
}

/// A client waiting for a server connection, counted until dropped.
struct Waited<'a>(&'a TenantCounters, Instant, &'a metrics::Histogram);

impl Drop for Waited<'_> {
    fn drop(&mut self) {
        let waited = self.1.elapsed();
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0
            .wait_nanos
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        self.2.record(waited.as_secs_f64());
    }
}

/// Why a session ends with an error to its client: (SQLSTATE, message).
struct Fatal(&'static str, String);

/// The SQLSTATE of a [`Fatal`] whose client has had its last message.
const TOLD: &str = "";

/// A statement a client prepared: silo's name for it, and its `Parse`
/// body after the name (query text and parameter types).
struct Prepared {
    server_name: String,
    /// When it was kept (the client's statements in order): a
    /// `DEALLOCATE ALL` drops those kept before it was sent.
    seq: u64,
    rest: Bytes,
    /// Running it may change session state (see [`changes_session`]): a
    /// server connection it runs on is reset before another client has it.
    changes: bool,
}

/// A response the server owes for a message it was sent: in which sync
/// it falls, whether the client must not see it, and (for a Parse) the
/// statement it prepares.
struct Owed {
    sync: u64,
    hidden: bool,
    statement: Option<String>,
    /// For a client's `Parse` of a named statement: its
    /// [`Prepared::seq`] (0 otherwise).
    client_seq: u64,
}

pub(super) struct Session {
    shared: Arc<Shared>,
    mode: PoolMode,
    /// A read-only credential: its server connections are its tenant's
    /// reader role's.
    read_only: bool,
    tenant: Uuid,
    slug: String,
    reader: Reader,
    writer: WriteHalf<Box<dyn Io>>,
    out: BytesMut,
    server: Option<Checkout>,
    /// The pool its server connections come from, while it stands.
    pool: Option<Arc<super::pool::WirePool>>,
    transactions: metrics::Counter,
    errors: metrics::Counter,
    wait_seconds: metrics::Histogram,
    /// Settings the client asked for at startup.
    wanted: Vec<(String, String)>,
    statements: HashMap<String, Prepared>,
    /// What `statements` takes, by [`statement_cost`]; at most the
    /// front door's `max_prepared_bytes`.
    prepared_bytes: usize,
    /// The last statement kept (see [`Prepared::seq`]), and the last
    /// whose `Parse` the server answered: a `DEALLOCATE ALL` or `DISCARD
    /// ALL` the server says it ran, by either protocol, dropped those up
    /// to it (their `Parse`s came before it; later ones come after).
    statement_seq: u64,
    answered_seq: u64,
    /// `Sync`s (and simple queries, function calls) sent, and
    /// `ReadyForQuery`s received.
    sent_syncs: u64,
    done_syncs: u64,
    /// Extended-protocol messages sent since the last `Sync`.
    in_batch: bool,
    parses: VecDeque<Owed>,
    closes: VecDeque<Owed>,
    /// Statements whose `Parse` is on its way to the current server
    /// connection, with the sync it falls in (an error in that sync skips it).
    pending: HashMap<String, u64>,
    /// The client's unnamed statement (its `Parse` body after the name),
    /// for a `Bind` or `Describe` in a later `Sync`, which may come on
    /// another server connection (sqlx, pgx's describe-exec mode).
    unnamed: Option<(Bytes, bool)>,
    /// The current server connection holds that statement.
    unnamed_here: bool,
    /// The server answered a `Bind` in the current sync: a `COPY FROM
    /// STDIN` starting now was started by the extended protocol.
    bound: bool,
    /// In such a copy: PostgreSQL ignores the client's `Sync`s until it ends.
    copy_in: bool,
    /// The client may have changed session state: reset before another
    /// client gets its server connection.
    dirty: bool,
    /// Transaction status of the last `ReadyForQuery`.
    status: u8,
    /// A write to the client was cut short inside its bytes: the client's
    /// stream stops mid-message, and nothing more can be said on it.
    torn: bool,
    ender: Arc<Ender>,
    session_id: u64,
    cancel_key: (i32, i32),
    cancel_slot: Arc<CancelSlot>,
    tenant_slot: TenantSlot,
}

enum Event {
    Client(Option<Result<Msg, proto::FrameError>>),
    Server(Option<Result<Msg, proto::FrameError>>),
    Ended,
    Idle,
}

impl Session {
    /// Serve the client until it leaves or its session is ended; `client`
    /// is its place under the front door's client limit.
    ///
    /// Not an `async fn`: one moves its arguments into locals of its own,
    /// and the session would take room twice in every client's task; a
    /// block that only borrows what it captured keeps it once (the test
    /// `task_size` holds it to that).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, client: OwnedSemaphorePermit) -> impl std::future::Future<Output = ()> + Send {
        async move {
            match self.serve().await {
                Ok(()) => Box::pin(self.finish()).await,
                Err(Fatal(code, msg)) => Box::pin(self.fail(code, &msg)).await,
            }
            drop(client);
        }
    }

    /// The message loop: until the client leaves (`Ok`) or the session
    /// must end with an error to it.
    async fn serve(&mut self) -> Result<(), Fatal> {
        let idle_limit = self.shared.settings.client_idle_timeout;
        let spin_window = self.shared.settings.spin;
        let token = self.ender.token.clone();
        // Made once: a waiter registered anew each round trip would lock
        // the token's list twice per message.
        let ended = token.cancelled();
        tokio::pin!(ended);
        let outcome: Result<(), Fatal> = loop {
            let quiet = self.server.is_none() || self.status == b'I';
            let idle_wait = async move {
                match idle_limit {
                    Some(d) if quiet => tokio::time::sleep(d).await,
                    _ => std::future::pending().await,
                }
            };
            // The side that speaks next: the server while it owes answers.
            let side = if self.sent_syncs > self.done_syncs {
                Side::Server
            } else {
                Side::Client
            };
            // `biased`: polled in this order, no random draw per message;
            // the server's answers go first, so a client sending fast
            // cannot hold them back. The first and last branches mark
            // what is polled between them as waiting for `side`.
            let event = match self.server.as_mut() {
                Some(server) => tokio::select! {
                    biased;
                    never = spin::expect(side, spin_window) => match never {},
                    _ = &mut ended => Event::Ended,
                    m = server.conn().recv_frame() => Event::Server(m),
                    m = self.reader.next() => Event::Client(m),
                    _ = idle_wait => Event::Idle,
                    never = spin::Unexpect => match never {},
                },
                None => tokio::select! {
                    biased;
                    never = spin::expect(side, spin_window) => match never {},
                    _ = &mut ended => Event::Ended,
                    m = self.reader.next() => Event::Client(m),
                    _ = idle_wait => Event::Idle,
                    never = spin::Unexpect => match never {},
                },
            };
            spin::clear();
            spin::note_activity();
            let step = match event {
                Event::Client(Some(Ok(m))) => self.on_client(m).await,
                Event::Client(Some(Err(proto::FrameError::TooLarge(n)))) => Err(Fatal(
                    "54000",
                    format!("message of {n} bytes is larger than this server allows"),
                )),
                Event::Client(Some(Err(_))) => {
                    Err(Fatal("08P01", "invalid message from client".into()))
                }
                Event::Client(None) => break Ok(()),
                Event::Server(Some(Ok(m))) => self.on_server(m).await,
                Event::Server(Some(Err(proto::FrameError::TooLarge(n)))) => Err(Fatal(
                    "54000",
                    format!("a message of {n} bytes from the database is larger than this server relays (SILO_PG_MAX_MESSAGE_BYTES)"),
                )),
                Event::Server(_) => Err(lost()),
                Event::Ended => Err(self.ended()),
                Event::Idle => Err(Fatal(
                    "57P05",
                    "terminating connection due to idle-session timeout".into(),
                )),
            };
            match step {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                // A step cut short by the session's end says why it ended.
                Err(_) if self.ender.token.is_cancelled() => break Err(self.ended()),
                Err(f) => break Err(f),
            }
        };
        outcome
    }

    /// Tell the client why it ends (unless it was told), and end.
    async fn fail(&mut self, code: &str, message: &str) {
        // Inside a message to the client (a write cut short, or a row
        // being passed on in parts), an error would land in its bytes: the
        // client is left without one, as PostgreSQL leaves it when ended
        // mid-send.
        let torn = self.torn || self.server.as_mut().is_some_and(|s| s.conn().mid_message());
        // Its server connection's state is unknown: closed, not reused,
        // and at once, not after the client took its message.
        self.stop_running();
        self.server.take();
        self.cleanup();
        if torn {
            self.out.clear();
        } else if code != TOLD {
            self.out
                .extend_from_slice(&proto::error_frame("FATAL", code, message));
        }
        // A client that does not read cannot hold its task (nor a
        // stopping silo, which waits for its sessions) longer than this.
        let _ = tokio::time::timeout(LAST_WORDS, async {
            let _ = self.flush_client().await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }

    /// The client left: its server connection back to the pool if it can be.
    async fn finish(&mut self) {
        self.detach_or_close().await;
        self.cleanup();
    }

    fn cleanup(&mut self) {
        self.shared.forget_session(self.tenant, self.session_id);
        self.shared
            .cancels
            .lock()
            .expect("cancels lock")
            .remove(&self.cancel_key);
    }

    /// Handle a client message; `Ok(false)`: the client said goodbye.
    async fn on_client(&mut self, m: Msg) -> Result<bool, Fatal> {
        if m.tag == b'X' {
            return Ok(false);
        }
        if m.tag == b'P' {
            self.admit_statement(m.body())?;
        }
        if m.tag == b'H' && self.server.is_none() {
            // A `Flush` between transactions (libpq may send it apart
            // from the `Sync` before it) asks nothing of a server.
            return Ok(true);
        }
        if m.tag == b'Q' && self.deallocated_here(m.body()) {
            self.flush_client()
                .await
                .map_err(|_| Fatal("08006", "client went away".into()))?;
            return Ok(true);
        }
        let m = if m.tag == b'Q'
            && self.server.is_none()
            && self.shared.settings.shared_connections > 0
        {
            match Box::pin(self.try_shared(m)).await? {
                Some(m) => m,
                None => return Ok(true),
            }
        } else {
            m
        };
        if self.server.is_none() {
            Box::pin(self.attach()).await.inspect_err(|_| {
                metrics::counter!("silo_wire_refused_total", "reason" => "no_server").increment(1);
            })?;
        }
        self.forward_client(m);
        let more = proto::has_whole_message(self.reader.read_buffer());
        if !more {
            let server = self.server.as_mut().expect("attached");
            server.conn().flush().await.map_err(|_| lost())?;
        }
        Ok(true)
    }

    /// A simple query between transactions, run on a shared connection
    /// of its tenant if it may be (see `wire::mux`); `Some` gives it back
    /// to run as usual.
    async fn try_shared(&mut self, m: Msg) -> Result<Option<Msg>, Fatal> {
        if self.mode != PoolMode::Transaction
            || self.status != b'I'
            || self.in_batch
            || self.sent_syncs != self.done_syncs
        {
            return Ok(Some(m));
        }
        let Some(pool) = self.pool.as_ref().filter(|p| !p.is_closed()).cloned() else {
            return Ok(Some(m));
        };
        let lines = self.shared.settings.shared_connections;
        // The tenant's figures first: no text is read for a tenant that
        // is not busy.
        if !mux::busy(&pool, lines) || !sharable(m.body()) {
            return Ok(Some(m));
        }
        let Some(mut ticket) = mux::submit(&pool, lines, &m.frame, &self.ender, &self.wanted).await
        else {
            return Ok(Some(m));
        };
        *self.cancel_slot.shared.lock().expect("cancel slot") =
            Some((ticket.line.clone(), ticket.id, ticket.cancel.clone()));
        let answered = self.shared_answer(&mut ticket).await;
        *self.cancel_slot.shared.lock().expect("cancel slot") = None;
        Ok((!answered?).then_some(m))
    }

    /// Pass a shared query's answer on to the client; `Ok(false)`: it was
    /// not sent, and must run as usual.
    async fn shared_answer(&mut self, ticket: &mut mux::Ticket) -> Result<bool, Fatal> {
        let gone = |_| Fatal("08006", "client went away".into());
        let mut started = false;
        loop {
            let answer = tokio::select! {
                biased;
                () = self.ender.token.cancelled() => {
                    ticket.line.cancel(ticket.id);
                    return Err(self.ended());
                }
                () = ticket.cancel.notified(), if !started => {
                    // Cancelled while queued behind another client's query:
                    // answered here, as the server would; it runs there to
                    // its end all the same, its answer dropped.
                    self.count_errors(1);
                    proto::error(&mut self.out, "ERROR", "57014", "canceling statement due to user request");
                    proto::ready_for_query(&mut self.out, b'I');
                    self.flush_client().await.map_err(gone)?;
                    return Ok(true);
                }
                a = ticket.answers.recv() => a,
            };
            match answer {
                Some(mux::Answer::Retry) if !started => return Ok(false),
                Some(mux::Answer::Part { bytes, torn }) => {
                    started = true;
                    self.flush_client().await.map_err(gone)?;
                    self.write_client(&bytes).await.map_err(gone)?;
                    // Inside a message: an error now would land in its bytes.
                    self.torn = torn;
                }
                Some(mux::Answer::Done {
                    bytes,
                    errors,
                    status,
                    reported,
                }) => {
                    self.count_errors(errors);
                    self.status = status;
                    for frame in reported {
                        self.client_sees(&Msg { tag: b'S', frame });
                    }
                    let counters = &self.tenant_slot.counters;
                    counters.shared.fetch_add(1, Ordering::Relaxed);
                    if status == b'I' {
                        self.tenant_slot
                            .counters
                            .transactions
                            .fetch_add(1, Ordering::Relaxed);
                        self.transactions.increment(1);
                    }
                    self.flush_client().await.map_err(gone)?;
                    self.write_client(&bytes).await.map_err(gone)?;
                    self.torn = false;
                    if status != b'I' {
                        // Cannot be, for one `SELECT` (the line ends).
                        return Err(lost());
                    }
                    return Ok(true);
                }
                Some(mux::Answer::Lost(Some(last_word))) if !self.torn => {
                    // The server's own last word is the client's.
                    self.count_errors(1);
                    self.out.extend_from_slice(&last_word);
                    self.flush_client().await.ok();
                    return Err(Fatal(TOLD, String::new()));
                }
                _ => return Err(lost()),
            }
        }
    }

    fn count_errors(&self, n: u32) {
        if n > 0 {
            self.tenant_slot
                .counters
                .errors
                .fetch_add(u64::from(n), Ordering::Relaxed);
            self.errors.increment(u64::from(n));
        }
    }

    /// Before a `Parse`: a named statement may be kept only within the
    /// client's share of memory (its text is kept to prepare it again on
    /// other server connections; without a bound, one client could make
    /// silo hold any amount of it, for every tenant's loss).
    fn admit_statement(&self, body: &[u8]) -> Result<(), Fatal> {
        let Some((name, rest)) = proto::split_cstr(body).filter(|(n, _)| !n.is_empty()) else {
            return Ok(());
        };
        let replaced = self
            .statements
            .get(name)
            .map_or(0, |p| statement_cost(name, &p.rest));
        let limit = self.shared.settings.max_prepared_bytes;
        if self.prepared_bytes - replaced + statement_cost(name, rest) > limit {
            metrics::counter!("silo_wire_refused_total", "reason" => "prepared_bytes").increment(1);
            return Err(Fatal(
                "54000",
                format!(
                    "prepared statements of this connection would take more than {limit} bytes \
                     (SILO_PG_MAX_PREPARED_BYTES); close statements no longer used"
                ),
            ));
        }
        Ok(())
    }

    /// `DEALLOCATE name` of a statement the client prepared by the
    /// protocol, alone in a simple query with nothing else under way: its
    /// server connections know it by silo's name, not the client's (and it
    /// may be prepared on none), so silo forgets it and answers as
    /// PostgreSQL would. Drivers evict their statements so (Rails,
    /// psycopg on libpq before 17). Queued answers in `out` if so.
    fn deallocated_here(&mut self, body: &[u8]) -> bool {
        if self.sent_syncs != self.done_syncs || self.in_batch || self.copy_in {
            return false;
        }
        let Some((sql, _)) = proto::split_cstr(body) else {
            return false;
        };
        // Every simple query passes here: only a `DEALLOCATE` of a client
        // with statements is read further.
        if self.statements.is_empty() || !first_word(sql).0.eq_ignore_ascii_case("DEALLOCATE") {
            return false;
        }
        let (mut statements, mut drops) = (0, None);
        let whole = any_statement(sql, |s| {
            let (word, rest) = first_word(s);
            if !word.is_empty() || !rest.trim().is_empty() {
                statements += 1;
                drops = deallocated_name(s);
            }
            false
        });
        let (Some(_), 1, Some(name)) = (whole, statements, drops) else {
            return false;
        };
        if !self.statements.contains_key(&name) {
            return false;
        }
        if self.status == b'E' {
            proto::error(
                &mut self.out,
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
        } else {
            self.forget_statement(&name);
            proto::command_complete(&mut self.out, "DEALLOCATE");
        }
        // As any simple query, it ends the unnamed statement.
        self.unnamed = None;
        self.unnamed_here = false;
        proto::ready_for_query(&mut self.out, self.status);
        true
    }

    /// Keep (or replace) the client's statement `name`, counting its cost.
    fn keep_statement(&mut self, name: &str, mut prepared: Prepared) {
        self.statement_seq += 1;
        prepared.seq = self.statement_seq;
        self.prepared_bytes += statement_cost(name, &prepared.rest);
        if let Some(old) = self.statements.insert(name.to_owned(), prepared) {
            self.prepared_bytes -= statement_cost(name, &old.rest);
        }
    }

    /// Forget the client's statements kept up to `seq` (the server ran a
    /// `DEALLOCATE ALL` or `DISCARD ALL` sent after them).
    fn drop_statements_up_to(&mut self, seq: u64) {
        let mut freed = 0;
        self.statements.retain(|name, p| {
            let keep = p.seq > seq;
            if !keep {
                freed += statement_cost(name, &p.rest);
            }
            keep
        });
        self.prepared_bytes -= freed;
    }

    /// Forget the client's statement `name`; silo's name for it, if it had it.
    fn forget_statement(&mut self, name: &str) -> Option<String> {
        let old = self.statements.remove(name)?;
        self.prepared_bytes -= statement_cost(name, &old.rest);
        Some(old.server_name)
    }

    /// Queue a client message for the server, renaming prepared statements.
    fn forward_client(&mut self, m: Msg) {
        let sync = self.sent_syncs;
        let server = self.server.as_mut().expect("attached").conn();
        match m.tag {
            b'P' => {
                self.in_batch = true;
                let Some((name, rest)) = proto::split_cstr(m.body()) else {
                    server.push(&m.frame);
                    return;
                };
                let changes = proto::split_cstr(rest).is_some_and(|(sql, _)| changes_session(sql));
                self.dirty |= changes;
                if name.is_empty() {
                    self.parses.push_back(Owed {
                        sync,
                        hidden: false,
                        statement: None,
                        client_seq: 0,
                    });
                    // Copied: the frame shares its read buffer, which an
                    // idle client should not keep.
                    self.unnamed = Some((Bytes::copy_from_slice(rest), changes));
                    self.unnamed_here = true;
                    server.push(&m.frame);
                    return;
                }
                let server_name = statement_name(rest);
                server.forget_prepared(&server_name);
                prepare(
                    server,
                    &mut self.pending,
                    &mut self.parses,
                    &mut self.closes,
                    sync,
                    &server_name,
                    rest,
                    false,
                );
                let name = name.to_owned();
                if let Some(owed) = self.parses.back_mut() {
                    owed.client_seq = self.statement_seq + 1;
                }
                self.keep_statement(
                    &name,
                    Prepared {
                        server_name,
                        seq: 0,
                        rest: Bytes::copy_from_slice(rest),
                        changes,
                    },
                );
            }
            b'B' => {
                self.in_batch = true;
                let renamed = proto::split_cstr(m.body()).and_then(|(portal, rest)| {
                    let (stmt, tail) = proto::split_cstr(rest)?;
                    let p = self.statements.get(stmt).filter(|_| !stmt.is_empty())?;
                    Some((
                        portal.to_owned(),
                        p.server_name.clone(),
                        p.rest.clone(),
                        tail.to_vec(),
                        p.changes,
                    ))
                });
                match renamed {
                    Some((portal, server_name, parse, tail, changes)) => {
                        // Run on this connection: its state may change
                        // here, wherever the statement was prepared.
                        self.dirty |= changes;
                        ensure_prepared(
                            server,
                            &mut self.pending,
                            &mut self.parses,
                            &mut self.closes,
                            sync,
                            &server_name,
                            &parse,
                        );
                        let mut head = portal.into_bytes();
                        head.push(0);
                        proto::renamed(server.out(), b'B', &head, &server_name, &tail);
                    }
                    None => {
                        let unnamed = proto::split_cstr(m.body())
                            .and_then(|(_, rest)| proto::split_cstr(rest))
                            .is_some_and(|(stmt, _)| stmt.is_empty());
                        if unnamed {
                            self.dirty |= self.unnamed.as_ref().is_some_and(|u| u.1);
                            self.unnamed_again(sync);
                        }
                        let server = self.server.as_mut().expect("attached").conn();
                        server.push(&m.frame);
                    }
                }
            }
            b'D' | b'C' => {
                self.in_batch = true;
                let body = m.body();
                let renamed = (body.first() == Some(&b'S'))
                    .then(|| proto::split_cstr(&body[1..]))
                    .flatten()
                    .filter(|(n, _)| !n.is_empty())
                    .and_then(|(n, _)| {
                        self.statements
                            .get(n)
                            .map(|p| (n.to_owned(), p.server_name.clone(), p.rest.clone()))
                    });
                match (m.tag, renamed) {
                    (b'D', Some((_, server_name, parse))) => {
                        ensure_prepared(
                            server,
                            &mut self.pending,
                            &mut self.parses,
                            &mut self.closes,
                            sync,
                            &server_name,
                            &parse,
                        );
                        proto::renamed(server.out(), b'D', b"S", &server_name, &[]);
                    }
                    (b'C', Some((name, server_name, _))) => {
                        self.forget_statement(&name);
                        let server = self.server.as_mut().expect("attached").conn();
                        server.forget_prepared(&server_name);
                        // Closed after its `Parse`: that one's answer
                        // must not mark it held again.
                        disown(&mut self.parses, &mut self.pending, Some(&server_name));
                        proto::renamed(server.out(), b'C', b"S", &server_name, &[]);
                        self.closes.push_back(Owed {
                            sync,
                            hidden: false,
                            statement: None,
                            client_seq: 0,
                        });
                    }
                    (tag, _) => {
                        if tag == b'D' && body.get(..2) == Some(b"S\0") {
                            // The unnamed statement described.
                            self.unnamed_again(sync);
                        }
                        if tag == b'C' && body.get(..2) == Some(b"S\0") {
                            self.unnamed = None;
                        }
                        let server = self.server.as_mut().expect("attached").conn();
                        if tag == b'C' {
                            self.closes.push_back(Owed {
                                sync,
                                hidden: false,
                                statement: None,
                                client_seq: 0,
                            });
                        }
                        server.push(&m.frame);
                    }
                }
            }
            b'Q' => {
                server.push(&m.frame);
                // A simple query ends the unnamed statement.
                self.unnamed = None;
                self.unnamed_here = false;
                self.sent_syncs += 1;
                if let Some((sql, _)) = proto::split_cstr(m.body()) {
                    self.dirty |= changes_session(sql);
                    if drops_statements(sql) {
                        // Made again (closed first) when next used; a
                        // `Parse` before it answered later holds nothing.
                        server.forget_all_prepared();
                        disown(&mut self.parses, &mut self.pending, None);
                    }
                }
            }
            b'S' => {
                self.in_batch = false;
                // Inside an extended-protocol copy PostgreSQL ignores it:
                // no `ReadyForQuery` will answer it.
                if !self.copy_in {
                    self.sent_syncs += 1;
                }
                server.push(&m.frame);
            }
            b'F' => {
                // A function call by OID: what it changes cannot be read
                // from it (it may be `set_config`).
                self.dirty = true;
                self.in_batch = false;
                self.sent_syncs += 1;
                server.push(&m.frame);
            }
            b'c' | b'f' => {
                // CopyDone, CopyFail: the copy ends; `Sync`s count again.
                self.copy_in = false;
                server.push(&m.frame);
            }
            b'E' => {
                self.in_batch = true;
                server.push(&m.frame);
            }
            // `Flush` starts nothing: after a `Sync` (psycopg's pipelines
            // send one) the client is still between transactions, and its
            // server connection goes back to the pool.
            _ => server.push(&m.frame),
        }
    }

    /// A setting the server reported to the client (a `SET` it ran): the
    /// value the client now believes is given again to the next server
    /// connection it gets, as its startup values are.
    fn client_sees(&mut self, m: &Msg) {
        let Some((key, rest)) = proto::split_cstr(m.body()) else {
            return;
        };
        let Some(key) = TRACKED.iter().find(|t| **t == key) else {
            return;
        };
        let Some((value, _)) = proto::split_cstr(rest) else {
            return;
        };
        match self.wanted.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) if v == value => {}
            Some((_, v)) => *v = value.to_owned(),
            None => self.wanted.push(((*key).to_owned(), value.to_owned())),
        }
    }

    /// Before a `Bind` or `Describe` of the unnamed statement: prepare it
    /// again (its answer hidden) if it was prepared on another server
    /// connection, or on this one before another client had it.
    fn unnamed_again(&mut self, sync: u64) {
        if self.unnamed_here {
            return;
        }
        let Some((rest, _)) = self.unnamed.as_ref() else {
            return;
        };
        let server = self.server.as_mut().expect("attached").conn();
        proto::parse_renamed(server.out(), "", rest);
        self.parses.push_back(Owed {
            sync,
            hidden: true,
            statement: None,
            client_seq: 0,
        });
        self.unnamed_here = true;
    }

    /// Handle a server message; `Ok(true)` to go on.
    async fn on_server(&mut self, m: Msg) -> Result<bool, Fatal> {
        let mut hide = false;
        match m.tag {
            b'1' => {
                if let Some(owed) = self.parses.pop_front() {
                    self.answered_seq = self.answered_seq.max(owed.client_seq);
                    if let Some(name) = owed.statement {
                        self.pending.remove(&name);
                        if let Some(s) = self.server.as_mut() {
                            s.conn().note_prepared(name);
                        }
                    }
                    hide = owed.hidden;
                }
            }
            b'3' => {
                if let Some(owed) = self.closes.pop_front() {
                    hide = owed.hidden;
                }
            }
            b'S' => {
                if let Some(s) = self.server.as_mut() {
                    s.conn().note_parameter(&m);
                }
                self.client_sees(&m);
            }
            b'2' => self.bound = true,
            b'C' => {
                let tag = proto::split_cstr(m.body()).map_or("", |(t, _)| t);
                if matches!(tag, "DEALLOCATE ALL" | "DISCARD ALL") {
                    // Whatever the server held is gone (a `Parse` sent
                    // after it is answered after this); the client's
                    // statements too, as PostgreSQL has it (psycopg drops
                    // all after a rollback, then prepares under new names).
                    if let Some(s) = self.server.as_mut() {
                        s.conn().forget_all_prepared();
                    }
                    self.drop_statements_up_to(self.answered_seq);
                }
            }
            b'G' if self.bound => {
                // `COPY FROM STDIN` by `Bind`/`Execute`: the `Sync` sent
                // after the `Execute` (libpq, tokio-postgres) is ignored
                // by the server, as are any before the copy ends; the one
                // after `CopyDone`/`CopyFail` is answered.
                self.sent_syncs = self.done_syncs;
                self.copy_in = true;
            }
            b'E' => {
                self.count_errors(1);
                let (severity, _, _) = proto::error_fields(m.body());
                if matches!(severity.as_str(), "FATAL" | "PANIC") {
                    // The server's own last word is the client's.
                    self.out.extend_from_slice(&m.frame);
                    self.flush_client().await.ok();
                    return Err(Fatal(TOLD, String::new()));
                }
            }
            b'Z' => {
                self.bound = false;
                self.done_syncs += 1;
                // A copy ends by a `ReadyForQuery` at the latest; one more
                // than silo counted `Sync`s for (a client that skipped
                // `CopyDone` after an error in its copy) puts the count
                // right rather than leaving it behind for good.
                self.copy_in = false;
                self.sent_syncs = self.sent_syncs.max(self.done_syncs);
                self.status = m.body().first().copied().unwrap_or(b'I');
                if self.status == b'I' {
                    self.tenant_slot
                        .counters
                        .transactions
                        .fetch_add(1, Ordering::Relaxed);
                    self.transactions.increment(1);
                }
                // Whatever the finished sync still owed (skipped after an
                // error) will not come.
                let done = self.done_syncs;
                // A client's `Parse` skipped (or failed) came before all
                // that follows too: a later `DEALLOCATE ALL` drops it.
                let skipped = self.parses.iter().filter(|o| o.sync < done);
                let skipped = skipped.map(|o| o.client_seq).max().unwrap_or(0);
                self.answered_seq = self.answered_seq.max(skipped);
                self.parses.retain(|o| o.sync >= done);
                self.closes.retain(|o| o.sync >= done);
                if self.sent_syncs == self.done_syncs {
                    self.pending.clear();
                }
            }
            _ => {}
        }
        if !hide {
            if m.frame.len() > DIRECT_WRITE {
                // A large message goes out as it is, not copied first.
                self.flush_client()
                    .await
                    .map_err(|_| Fatal("08006", "client went away".into()))?;
                self.write_client(&m.frame)
                    .await
                    .map_err(|_| Fatal("08006", "client went away".into()))?;
            } else {
                self.out.extend_from_slice(&m.frame);
            }
        }
        let server_has_more = self
            .server
            .as_mut()
            .is_some_and(|s| s.conn().has_buffered_message());
        if !server_has_more || self.out.len() > 64 * 1024 {
            self.flush_client()
                .await
                .map_err(|_| Fatal("08006", "client went away".into()))?;
        }
        if m.tag == b'Z'
            && self.mode == PoolMode::Transaction
            && self.status == b'I'
            && self.sent_syncs == self.done_syncs
            && !self.in_batch
        {
            Box::pin(self.detach()).await;
        }
        Ok(true)
    }

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let out = self.out.split();
            self.write_client(&out).await?;
        }
        Ok(())
    }

    /// Write to the client, unless the session is ended first: a client
    /// that stops reading must not keep a revoked, suspended or stopping
    /// session (and its server connection) alive by never taking its
    /// answers.
    ///
    /// Boxed (a small allocation per flush): inline, the race would grow
    /// every client's task by its size (see the test `task_size`).
    async fn write_client(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let (writer, token, torn) = (&mut self.writer, &self.ender.token, &mut self.torn);
        Box::pin(async move {
            let mut written = 0;
            while written < bytes.len() {
                tokio::select! {
                    biased;
                    n = writer.write(&bytes[written..]) => match n? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => written += n,
                    },
                    _ = token.cancelled() => {
                        *torn |= written > 0;
                        return Err(std::io::Error::other("session ended"));
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// The error a session ended by its token (revocation, suspension, the
    /// front door stopping) ends with.
    fn ended(&self) -> Fatal {
        let why = self.ender.reason.lock().expect("reason lock").clone();
        // No reason given: the front door is stopping.
        Fatal(
            "57P01",
            if why.is_empty() {
                "terminating connection due to administrator command".into()
            } else {
                format!("terminating connection: {why}")
            },
        )
    }

    /// Get a server connection for this client (waiting through a move's
    /// cut-over), in step with the client's settings.
    async fn attach(&mut self) -> Result<(), Fatal> {
        let started = Instant::now();
        let deadline = started + self.shared.settings.wait_timeout;
        let counters = self.tenant_slot.counters.clone();
        counters.waiting.fetch_add(1, Ordering::AcqRel);
        let waited = Waited(&counters, started, &self.wait_seconds);
        let mut rereads = 0;
        let mut checkout = loop {
            // The pool of the last transaction, while it stands: any change
            // of the tenant (suspended, frozen for a move, moved, rotated)
            // closes it, and the tenant is read again.
            let pool = match self.pool.as_ref().filter(|p| !p.is_closed()) {
                Some(p) => p.clone(),
                None => {
                    let entry = self
                        .shared
                        .router
                        .resolve(&self.tenant.to_string())
                        .await
                        .map_err(|e| route_fatal(&self.slug, &e))?;
                    match TenantRouter::check_status(&entry) {
                        Ok(()) => {}
                        Err(RouteError::NotReady("moving")) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(25)).await;
                            continue;
                        }
                        Err(e) => return Err(route_fatal(&self.slug, &e)),
                    }
                    let pool = self
                        .shared
                        .pool_for(&entry, self.read_only)
                        .await
                        .map_err(|e| route_fatal(&self.slug, &e))?;
                    self.pool = Some(pool.clone());
                    pool
                }
            };
            match pool.acquire(deadline).await {
                Ok(c) => break c,
                Err(CheckoutError::Budget(AcquireError::Closed)) if Instant::now() < deadline => {
                    self.pool = None;
                }
                Err(CheckoutError::Budget(_)) => {
                    return Err(Fatal(
                        "53300",
                        format!(
                            "no connection to tenant \"{}\" is free, retry shortly",
                            self.slug
                        ),
                    ))
                }
                Err(CheckoutError::Connect(e))
                    if matches!(e.sqlstate(), Some("28P01" | "28000" | "3D000"))
                        && rereads < 3
                        && Instant::now() < deadline =>
                {
                    // Rotated, moved or restored under us: read the tenant again.
                    rereads += 1;
                    self.pool = None;
                    self.shared.close_pool(self.tenant);
                    self.shared.router.invalidate(self.tenant).await;
                    tokio::time::sleep(Duration::from_millis(20 * rereads)).await;
                }
                Err(CheckoutError::Connect(e)) => {
                    tracing::warn!(tenant_id = %self.tenant, "front door failed to connect to the tenant database: {e}");
                    if e.sqlstate() == Some(crate::servers::sqlstate::INVALID_PASSWORD) {
                        // Re-read, and still refused: the role set its own.
                        self.shared.router.note_lockout(self.tenant, self.read_only);
                    }
                    return Err(Fatal(
                        "08006",
                        format!(
                            "the database of tenant \"{}\" is unavailable, retry shortly",
                            self.slug
                        ),
                    ));
                }
            }
        };
        drop(waited);
        let conn = checkout.conn();
        // The tracked settings as this client has them (its own, else the
        // server's at login), whatever a client before it left; in session
        // mode also the rest it asked for.
        let mut sets = tracked_sets(&self.wanted, &conn.initial, &conn.params);
        if self.mode == PoolMode::Session {
            sets.extend(
                self.wanted
                    .iter()
                    .filter(|(k, _)| !TRACKED.contains(&k.as_str()))
                    .map(|(k, v)| set_config(k, v)),
            );
        }
        if !sets.is_empty() {
            if let Err(e) = conn
                .run_quietly(&format!("SELECT {}", sets.join(", ")))
                .await
            {
                let msg = match e {
                    super::backend::ConnectError::Refused(_, m) => m,
                    other => other.to_string(),
                };
                return Err(Fatal("22023", msg));
            }
        }
        *self.cancel_slot.server.lock().expect("cancel slot") =
            Some((conn.target.clone(), conn.pid, conn.secret));
        self.server = Some(checkout);
        self.unnamed_here = false;
        Ok(())
    }

    /// Before its server connection is closed: a statement still running
    /// there would go on until it next writes (a long query holding its
    /// budget slot, a revoked client's query running to its end); it is
    /// cancelled too.
    fn stop_running(&mut self) {
        if self.sent_syncs == self.done_syncs {
            return;
        }
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let conn = server.conn();
        let (target, pid, secret) = (conn.target.clone(), conn.pid, conn.secret);
        tokio::spawn(async move {
            let _ = target.cancel(pid, secret).await;
        });
    }

    /// Give the server connection back (transaction mode, between transactions).
    async fn detach(&mut self) {
        self.detach_or_close().await;
    }

    async fn detach_or_close(&mut self) {
        *self.cancel_slot.server.lock().expect("cancel slot") = None;
        // Not in a copy either: one started by `Bind`/`Execute` owes no
        // `ReadyForQuery` until it ends.
        let idle = self.status == b'I'
            && self.sent_syncs == self.done_syncs
            && !self.in_batch
            && !self.copy_in;
        if !idle {
            self.stop_running();
        }
        let Some(mut checkout) = self.server.take() else {
            return;
        };
        // Emptied and their room given back: a client idle between
        // transactions keeps no capacity it is not using.
        self.pending = HashMap::new();
        self.parses = VecDeque::new();
        self.closes = VecDeque::new();
        if !idle {
            return; // dropped: closed
        }
        // Session mode hands the connection on reset; transaction mode only
        // when the client may have changed session state.
        if self.dirty || self.mode == PoolMode::Session {
            let conn = checkout.conn();
            if conn.run_quietly("DISCARD ALL").await.is_err() {
                return;
            }
            conn.forget_all_prepared();
            self.dirty = false;
        }
        // More statements than it may keep (a client pipelined more
        // `Parse`s than that before one `Sync`): closed down to it before
        // another client has it.
        let conn = checkout.conn();
        let over = conn.over_cap();
        if !over.is_empty() {
            let sql: Vec<String> = over.iter().map(|n| format!("DEALLOCATE {n}")).collect();
            if conn.run_quietly(&sql.join("; ")).await.is_err() {
                return;
            }
        }
        checkout.release();
    }
}

/// Prepare statement `name` on the server connection (its answers
/// hidden) unless it is there, or its `Parse` is on its way in this same
/// sync (a `Parse` in an earlier one may have been skipped by an error).
#[allow(clippy::too_many_arguments)]
fn ensure_prepared(
    server: &mut super::backend::ServerConn,
    pending: &mut HashMap<String, u64>,
    parses: &mut VecDeque<Owed>,
    closes: &mut VecDeque<Owed>,
    sync: u64,
    name: &str,
    parse: &[u8],
) {
    if server.holds(name) || pending.get(name) == Some(&sync) {
        return;
    }
    prepare(server, pending, parses, closes, sync, name, parse, true);
}

/// `Close` then `Parse` of statement `name`: whatever silo believes the
/// server holds (a client's `DEALLOCATE`, an earlier `Parse` an error
/// skipped), it holds this statement after. The `Close` is never seen by
/// the client (closing what does not exist is no error); the `Parse`'s
/// answer is when the client sent it (`hidden` false).
#[allow(clippy::too_many_arguments)]
fn prepare(
    server: &mut super::backend::ServerConn,
    pending: &mut HashMap<String, u64>,
    parses: &mut VecDeque<Owed>,
    closes: &mut VecDeque<Owed>,
    sync: u64,
    name: &str,
    parse: &[u8],
    hidden: bool,
) {
    // Room for it: the least recently used statement there is closed (a
    // `Bind` of it queued before runs first; one after prepares it again).
    while let Some(victim) = server.evict_prepared(pending.len()) {
        proto::close_statement(server.out(), &victim);
        closes.push_back(Owed {
            sync,
            hidden: true,
            statement: None,
            client_seq: 0,
        });
        disown(parses, pending, Some(&victim));
    }
    proto::close_statement(server.out(), name);
    closes.push_back(Owed {
        sync,
        hidden: true,
        statement: None,
        client_seq: 0,
    });
    proto::parse_renamed(server.out(), name, parse);
    parses.push_back(Owed {
        sync,
        hidden,
        statement: Some(name.to_owned()),
        client_seq: 0,
    });
    pending.insert(name.to_owned(), sync);
}

/// Answers still owed to `Parse`s of statement `name` (all, for `None`)
/// sent before it was closed: they no longer mark it held, and it is no
/// longer on its way.
fn disown(parses: &mut VecDeque<Owed>, pending: &mut HashMap<String, u64>, name: Option<&str>) {
    for owed in parses.iter_mut() {
        if name.is_none() || owed.statement.as_deref() == name {
            owed.statement = None;
        }
    }
    match name {
        Some(n) => {
            pending.remove(n);
        }
        None => pending.clear(),
    }
}

fn route_fatal(slug: &str, e: &RouteError) -> Fatal {
    match e {
        RouteError::Locked(s) => Fatal("57P03", format!("tenant \"{slug}\" is {s}")),
        RouteError::NotFound => Fatal("57P01", format!("tenant \"{slug}\" no longer exists")),
        RouteError::Busy => Fatal(
            "53300",
            format!("no connection to tenant \"{slug}\" is free, retry shortly"),
        ),
        other => Fatal(
            "57P03",
            format!("tenant \"{slug}\" cannot be served now: {}", short(other)),
        ),
    }
}

/// The settings a client asked for at startup, by their canonical names:
/// the tracked ones (in any case: libpq sends `PGTZ` as `timezone`),
/// `application_name`, and `-c name=value` / `--name=value` in `options`.
fn wanted_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| {
        let k = TRACKED
            .iter()
            .find(|t| t.eq_ignore_ascii_case(k))
            .map_or_else(|| k.to_ascii_lowercase(), |t| (*t).to_owned());
        out.retain(|(n, _)| *n != k);
        out.push((k, v.to_owned()));
    };
    for (k, v) in params {
        if k == "options" {
            let mut words = v.split_ascii_whitespace();
            while let Some(w) = words.next() {
                let setting = match w {
                    "-c" => words.next(),
                    w => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")),
                };
                if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
                    let name = name.replace('-', "_");
                    if name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                    {
                        put(&name, value);
                    }
                }
            }
        } else if k == "application_name" || TRACKED.iter().any(|t| t.eq_ignore_ascii_case(k)) {
            put(k, v);
        }
    }
    out
}

/// silo's name for a prepared statement: derived from its text and
/// parameter types, so clients with the same statement share it.
fn statement_name(parse_rest: &[u8]) -> String {
    let digest = Sha256::digest(parse_rest);
    let mut name = String::from("silo_");
    for b in &digest[..12] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// The first keyword of `sql` (after blanks and comments), and the text
/// after it; compared case-insensitively, never copied (every simple query
/// and `Parse` goes through here).
fn first_word(sql: &str) -> (&str, &str) {
    let mut s = sql.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if s.starts_with("/*") {
            // Nested, as PostgreSQL reads them.
            s = comment_end(s.as_bytes(), 0)
                .map_or("", |end| &s[end..])
                .trim_start();
        } else {
            break;
        }
    }
    // A whole word, as PostgreSQL reads one: `SET local_x.y` sets
    // `local_x.y`, it is not `SET LOCAL`.
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Whether `word` is one of `words`, ignoring ASCII case.
fn is_one_of(word: &str, words: &[&str]) -> bool {
    words.iter().any(|w| w.eq_ignore_ascii_case(word))
}

/// Whether SQL text may leave session state behind (a setting, a prepared
/// statement, a listener, a temporary table, a held cursor, a session
/// lock), looked at statement by statement (split at every `;`, so more
/// often than needed, never less), and for the words that do it anywhere.
fn changes_session(sql: &str) -> bool {
    const ANYWHERE: &[&str] = &[
        "SET_CONFIG",
        // `UPDATE pg_settings SET setting = ...` is a `SET`.
        "PG_SETTINGS",
        "TEMP",
        "TEMPORARY",
        "HOLD",
        "PG_ADVISORY_LOCK",
        "PG_ADVISORY_LOCK_SHARED",
        "PG_TRY_ADVISORY_LOCK",
        "PG_TRY_ADVISORY_LOCK_SHARED",
        "SETSEED",
    ];
    // `U&"..."` spells any name (`U&"set\005Fconfig"`), `pg_temp` (and
    // `pg_temp_N`) is the session's own schema.
    if sql.contains("U&") || sql.contains("u&") {
        return true;
    }
    let words = sql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty());
    if words.clone().any(|w| {
        ANYWHERE.iter().any(|a| a.eq_ignore_ascii_case(w))
            || w.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("pg_temp"))
    }) {
        return true;
    }
    // Unterminated (`None`): nothing runs, but never guess.
    any_statement(sql, |statement| {
        let (first, rest) = first_word(statement);
        if first.eq_ignore_ascii_case("SET") {
            let (second, _) = first_word(rest);
            return !is_one_of(second, &["LOCAL", "TRANSACTION"]);
        }
        is_one_of(
            first,
            &[
                "RESET",
                "PREPARE",
                "LISTEN",
                "UNLISTEN",
                "DECLARE",
                "LOAD",
                "DISCARD",
                "DEALLOCATE",
                "DO",
                "CREATE",
            ],
        )
    })
    .unwrap_or(true)
}

/// The end of a session whose server connection was lost.
fn lost() -> Fatal {
    Fatal(
        "08006",
        "the connection to the tenant database was lost".into(),
    )
}

/// Whether a simple query may run on a shared connection (see
/// `wire::mux`): small, one `SELECT`, nothing it leaves on the connection
/// (see [`changes_session`]), and none of what would make the queries
/// behind it wait long for nothing (sleeps, row and advisory locks) or
/// reach beyond its own query (cancelling or ending a backend, a reload).
fn sharable(body: &[u8]) -> bool {
    const NOT_SHARED: &[&str] = &[
        "PG_SLEEP",
        "PG_SLEEP_FOR",
        "PG_SLEEP_UNTIL",
        "PG_CANCEL_BACKEND",
        "PG_TERMINATE_BACKEND",
        "PG_RELOAD_CONF",
        "PG_ADVISORY_XACT_LOCK",
        "PG_ADVISORY_XACT_LOCK_SHARED",
        "DBLINK_CONNECT",
        "DBLINK_CONNECT_U",
        // `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE`.
        "UPDATE",
        "SHARE",
    ];
    // A backslash may escape a quote as the server reads the text (with
    // `standard_conforming_strings` off, or as the second byte of a
    // character in SJIS, BIG5, GBK, …) where silo's reading does not:
    // never shared, so that what silo takes for one statement is one.
    if body.len() > mux::MAX_QUERY || body.contains(&b'\\') {
        return false;
    }
    let Some((sql, _)) = proto::split_cstr(body) else {
        return false;
    };
    let (mut statements, mut selects) = (0, 0);
    let split = any_statement(sql, |statement| {
        let first = first_word(statement).0;
        if !first.is_empty() {
            statements += 1;
            selects += usize::from(first.eq_ignore_ascii_case("SELECT"));
        }
        false
    });
    if split != Some(false) || statements != 1 || selects != 1 || changes_session(sql) {
        return false;
    }
    !sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| NOT_SHARED.iter().any(|n| n.eq_ignore_ascii_case(w)))
}

/// What one named statement of a client takes in silo: its name, its
/// `Parse` body, and room for silo's name and the map's entry.
fn statement_cost(name: &str, parse_rest: &[u8]) -> usize {
    name.len() + parse_rest.len() + 160
}

/// The statement `DEALLOCATE [PREPARE] name` drops (an unquoted name
/// folded to lower case, as PostgreSQL folds it); `None` for any other
/// statement, `DEALLOCATE ALL` included.
fn deallocated_name(statement: &str) -> Option<String> {
    // Nothing but blanks and comments left.
    let ends = |rest: &str| {
        let (word, after) = first_word(rest);
        word.is_empty() && after.trim().is_empty()
    };
    let (word, rest) = first_word(statement);
    if !word.eq_ignore_ascii_case("DEALLOCATE") {
        return None;
    }
    let (word, after) = first_word(rest);
    // `DEALLOCATE PREPARE x`; `DEALLOCATE prepare` names `prepare`.
    let rest = if word.eq_ignore_ascii_case("PREPARE") && !ends(after) {
        after
    } else {
        rest
    };
    let (word, after) = first_word(rest);
    if word.eq_ignore_ascii_case("ALL") {
        return None;
    }
    if !word.is_empty() {
        return ends(after).then(|| word.to_lowercase());
    }
    // A quoted name: `""` inside is one `"`.
    let quoted = after.strip_prefix('"')?;
    let mut name = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            name.push(c);
        } else if quoted[i + 1..].starts_with('"') {
            name.push('"');
            chars.next();
        } else {
            return (!name.is_empty() && ends(&quoted[i + 1..])).then_some(name);
        }
    }
    None
}

fn drops_statements(sql: &str) -> bool {
    any_statement(sql, |statement| {
        is_one_of(first_word(statement).0, &["DISCARD", "DEALLOCATE"])
    })
    .unwrap_or(true)
}

/// Whether `f` holds for a statement of SQL text, its statements split as
/// PostgreSQL splits them: at each `;` outside comments (`--`, nested
/// `/* */`), string literals (`'…'`, `E'…'` with backslash escapes),
/// quoted identifiers and dollar-quoted strings (a `;` in a comment must
/// not hide the statement after it, nor a `/*` in a literal the rest).
/// Each is a slice of `sql`, nothing copied: every simple query and `Parse`
/// goes through here. `None` when something is left unterminated
/// (PostgreSQL runs none of such text).
fn any_statement(sql: &str, mut f: impl FnMut(&str) -> bool) -> Option<bool> {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        i = match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n),
            b'/' if b.get(i + 1) == Some(&b'*') => comment_end(b, i)?,
            b'\'' => {
                let escapes =
                    i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e') && (i < 2 || !ident(b[i - 2]));
                quoted_end(b, i, b'\'', escapes)?
            }
            b'"' => quoted_end(b, i, b'"', false)?,
            // `$tag$` (or `$$`) opens a dollar-quoted string; `$1` is a
            // parameter, `a$b` an identifier.
            b'$' if i == 0 || !ident(b[i - 1]) => {
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                    .map(|n| i + 1 + n)
                    .filter(|&e| b[e] == b'$' && (e == i + 1 || !b[i + 1].is_ascii_digit()));
                match tag_end {
                    Some(e) => {
                        let tag = &b[i..=e];
                        let close = b[e + 1..].windows(tag.len()).position(|w| w == tag)?;
                        e + 1 + close + tag.len()
                    }
                    None => i + 1,
                }
            }
            b';' => {
                if f(&sql[start..i]) {
                    return Some(true);
                }
                start = i + 1;
                i + 1
            }
            _ => i + 1,
        };
    }
    Some(f(&sql[start..]))
}

/// Where the (nested) comment opening at `b[at..]` ends, past its `*/`.
fn comment_end(b: &[u8], at: usize) -> Option<usize> {
    let (mut depth, mut i) = (0, at);
    loop {
        match (b.get(i), b.get(i + 1)) {
            (Some(b'/'), Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (Some(b'*'), Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            (Some(_), _) => i += 1,
            (None, _) => return None,
        }
    }
}

/// Where the literal or identifier opening with `quote` at `b[at]` ends,
/// past its closing quote (a doubled quote is one character; with
/// `escapes`, a backslash escapes the next byte).
fn quoted_end(b: &[u8], at: usize, quote: u8, escapes: bool) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match *b.get(i)? {
            b'\\' if escapes => i += 2,
            c if c == quote && b.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// `set_config(name, value, false)`: a setting as `-c name=value` gives it
/// (a list such as `search_path` parsed from the text, as at login).
/// `set_config` calls that give a server connection now at `params` the
/// tracked settings a client asking for `wanted` has: its own, else
/// `initial` (the server's at login).
pub(super) fn tracked_sets(
    wanted: &[(String, String)],
    initial: &HashMap<String, String>,
    params: &HashMap<String, String>,
) -> Vec<String> {
    TRACKED
        .iter()
        .filter_map(|k| {
            let want = wanted
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .or_else(|| initial.get(*k))?;
            (params.get(*k) != Some(want)).then(|| set_config(k, want))
        })
        .collect()
}

pub(super) fn set_config(name: &str, value: &str) -> String {
    format!(
        "pg_catalog.set_config({}, {}, false)",
        quote_literal(name),
        quote_literal(value)
    )
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_changing_statements_are_told_apart() {
        for (sql, dirty) in [
            ("SELECT 1", false),
            ("  set search_path = x", true),
            ("SET LOCAL statement_timeout = 5", false),
            ("/* hi */ LISTEN x", true),
            ("-- c\nselect pg_advisory_lock(1)", true),
            ("CREATE TEMP TABLE t (a int)", true),
            ("INSERT INTO t VALUES (1)", false),
            ("BEGIN", false),
            ("UPDATE t SET a = 1 WHERE b = 2", false),
            // What an attacker tried, each leaking before:
            ("select 1; set statement_timeout='1ms'", true),
            ("set local work_mem='1MB'; set work_mem='77MB'", true),
            ("begin; set x.y='leaked'; commit", true),
            (
                "update pg_settings set setting = 'on' where name = 'default_transaction_read_only'",
                true,
            ),
            ("UPDATE pg_catalog.PG_SETTINGS SET setting = 'x'", true),
            // A `;` in a comment must not hide the statement after it.
            ("/*;*/SET default_transaction_read_only=on", true),
            ("SELECT 1;/*;*/SET search_path=pg_catalog", true),
            ("/* a /* nested ; */ comment */ LISTEN chan", true),
            ("/* /* */ SELECT */ SET x.y = 1", true),
            ("SET /* a /* b */ c */ LOCAL work_mem = '1MB'", false),
            ("-- ;\nRESET work_mem", true),
            ("SELECT 1; /*;*/ DO $x$ begin execute 'se'||'t x=1'; end $x$", true),
            // Nor a `/*` or `--` in a literal the rest of the text.
            ("SELECT '/*'; SET search_path = x; SELECT '*/'", true),
            ("SELECT E'it\\'s' ; SET x.y = 1", true),
            // (an escaped quote: all one literal, nothing is SET)
            ("SELECT E'\\' ; SET x.y = 1 ; SELECT 1 -- '", false),
            ("SELECT $q$ /* $q$; PREPARE p AS SELECT 1; SELECT $q$ */ $q$", true),
            // Unterminated: never guessed clean.
            ("SELECT 1 /* ; SET x = 1", true),
            // What is only text stays clean.
            ("SELECT 'SET x = 1; LISTEN y'", false),
            ("SELECT $$; SET x = 1$$, $1", false),
            ("SELECT \"a;b\" FROM t -- ; SET x", false),
            ("do $$begin execute 'set work_mem=''66MB'''; end$$", true),
            ("select pg_try_advisory_lock(4242)", true),
            ("select 1 as a into temp leak_t", true),
            (
                "begin; declare c cursor with hold for select 1; commit",
                true,
            ),
            ("SELECT set_config('search_path', 'x', false)", true),
            // The second review's, each leaking before:
            ("SET local_app.user_id = 'alice'", true),
            ("SELECT 1 AS a INTO pg_temp.leak_t", true),
            ("select * from PG_TEMP_3.t", true),
            (
                r#"SELECT U&"set\005Fconfig"('search_path','x',false)"#,
                true,
            ),
            (r#"select u&"pg\005Fadvisory\005Flock"(777)"#, true),
            ("select setseed(0.5)", true),
        ] {
            assert_eq!(changes_session(sql), dirty, "{sql}");
        }
        assert!(drops_statements("discard all"));
        assert!(drops_statements("SELECT 1; DEALLOCATE ALL"));
        assert!(!drops_statements("select 1"));
    }

    #[test]
    fn startup_settings_are_named_canonically_and_options_read() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
        };
        let got = wanted_settings(&p(&[
            ("timezone", "Asia/Tokyo"),
            ("datestyle", "ISO, DMY"),
            ("application_name", "app"),
            (
                "options",
                "-c search_path=app,public --statement-timeout=5s -cwork_mem=8MB -c bad;name=x",
            ),
            ("user", "u"),
        ]));
        assert_eq!(
            got,
            p(&[
                ("TimeZone", "Asia/Tokyo"),
                ("DateStyle", "ISO, DMY"),
                ("application_name", "app"),
                ("search_path", "app,public"),
                ("statement_timeout", "5s"),
                ("work_mem", "8MB"),
            ])
        );
    }

    #[test]
    fn tenants_are_named_by_their_first_label_only() {
        let d = Some("clinics.example.com");
        assert_eq!(
            tenant_of_host("Acme.clinics.example.com", d).as_deref(),
            Some("acme")
        );
        assert_eq!(tenant_of_host("a.b.clinics.example.com", d), None);
        assert_eq!(tenant_of_host("clinics.example.com", d), None);
        assert_eq!(tenant_of_host("acme.other.com", d), None);
        assert_eq!(tenant_of_host("acme.clinics.example.com", None), None);
    }

    #[test]
    fn only_single_reads_that_leave_nothing_behind_are_shared() {
        let q = |sql: &str| {
            let mut body = sql.as_bytes().to_vec();
            body.push(0);
            sharable(&body)
        };
        for yes in [
            "SELECT 1",
            "select 1;",
            "/* a; b */ SELECT ';' -- ;\n",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "SELECT * FROM updates",
        ] {
            assert!(q(yes), "{yes}");
        }
        for no in [
            "SELECT 1; SELECT 2",
            "BEGIN",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "INSERT INTO t VALUES (1)",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_sleep(1)",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR KEY SHARE",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_terminate_backend(pg_backend_pid())",
            "SELECT * INTO TEMP t FROM u",
            "SELECT 'unterminated",
            "SELECT 'a\\' , '; COPY t FROM STDIN; SELECT 'x\\''",
            "SELECT E'\\''",
            "",
        ] {
            assert!(!q(no), "{no}");
        }
        assert!(!q(&format!("SELECT '{}'", "x".repeat(mux::MAX_QUERY))));
    }

    #[test]
    fn deallocations_are_read_as_postgresql_reads_them() {
        let named = |n: &str| Some(n.to_owned());
        let dropped = deallocated_name;
        assert_eq!(dropped("DEALLOCATE a1"), named("a1"));
        assert_eq!(dropped(" deallocate prepare _PG3_7 "), named("_pg3_7"));
        assert_eq!(
            dropped("/* evict */ DEALLOCATE \"My \"\"S\"\"\""),
            named("My \"S\"")
        );
        // All of them: not a name.
        assert_eq!(dropped("DEALLOCATE ALL"), None);
        assert_eq!(dropped("deallocate prepare all"), None);
        assert_eq!(dropped("DEALLOCATE \"all\""), named("all"));
        assert_eq!(dropped("DISCARD ALL"), None);
        assert_eq!(dropped("DEALLOCATE"), None);
        assert_eq!(dropped("DEALLOCATE a b"), None);
        assert_eq!(dropped("DEALLOCATE \"a\" b"), None);
        assert_eq!(dropped("SELECT 'DEALLOCATE a'"), None);
        assert_eq!(dropped("DEALLOCATE a -- evicted"), named("a"));
        assert_eq!(dropped("DEALLOCATE /* x */ \"B\" /* y */"), named("B"));
        assert_eq!(dropped("DEALLOCATE prepare"), named("prepare"));
        assert_eq!(dropped("DEALLOCATE \"\""), None);
    }

    #[test]
    fn statement_names_follow_the_text() {
        assert_eq!(
            statement_name(b"select 1\0\0\0"),
            statement_name(b"select 1\0\0\0")
        );
        assert_ne!(
            statement_name(b"select 1\0\0\0"),
            statement_name(b"select 2\0\0\0")
        );
        assert!(statement_name(b"x").len() < 64);
    }
}

#[cfg(test)]
mod task_size {
    use super::*;

    fn future_of<A, B, F>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    fn borrowing_future_of<'a, F>(_: fn(&'a mut Session) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A logged-in client's task is its session's future: 10,000 idle
    /// clients keep 10,000 of them. It holds the session once (an `async
    /// fn` taking it by value, or a step that moves it, would hold it
    /// twice), the message loop, and little else; the one-off steps are
    /// boxed, not kept inline.
    #[test]
    fn an_idle_client_s_task_holds_its_session_once() {
        let session = std::mem::size_of::<Session>();
        let run = future_of(Session::run);
        let serve = borrowing_future_of(Session::serve);
        assert!(
            run < 2 * session && run <= session + serve + 128,
            "session {session} B, its task's future {run} B, the message loop {serve} B"
        );
        // What an idle session holds inline stays small; a server
        // connection is boxed in its checkout.
        assert!(std::mem::size_of::<Checkout>() <= 64);
        assert!(session <= 640, "session {session} B");
        assert!(serve <= 512, "message loop {serve} B");
    }
}
