//! A raw connection to a tenant server, logged in as the tenant's role:
//! messages are forwarded to and from it whole. Its budget permit
//! ([`Held`]) goes back once its backend is gone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::{FutureExt, StreamExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::codec::FramedRead;

use super::proto::{self, Codec, Msg};
use super::spin::{Side, Spinning};
use crate::router::pool::{Claim, Held};
use crate::router::tls::ServerTls;

/// Where a tenant server listens.
#[derive(Debug, Clone)]
pub enum Target {
    /// Host, port, and TLS as the server's admin URL asks.
    Tcp(String, u16, Arc<ServerTls>),
    /// The socket file (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl Target {
    async fn open(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Self::Tcp(host, port, tls) => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                match tls.as_ref() {
                    ServerTls::Off => Stream::tcp(s),
                    ServerTls::Unusable(why) => {
                        return Err(std::io::Error::other(format!(
                            "the server's TLS settings cannot be used: {why}"
                        )))
                    }
                    ServerTls::Prefer(c) => encrypt(s, host, c, false).await?,
                    ServerTls::Require(c) => encrypt(s, host, c, true).await?,
                }
            }
            Self::Unix(path) => Stream::Unix(Spinning::new(
                UnixStream::connect(path).await?,
                Side::Server,
            )),
        })
    }

    /// Ask the server to cancel what backend `pid` runs (the secret proves
    /// it is ours to cancel).
    pub async fn cancel(&self, pid: i32, secret: i32) -> std::io::Result<()> {
        let mut s = tokio::time::timeout(Duration::from_secs(5), self.open())
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        let mut out = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut out);
        s.write_all(&out).await?;
        let _ = s.shutdown().await;
        Ok(())
    }
}

/// Ask the server for TLS (`SSLRequest`) and shake hands if it agrees;
/// if it does not, plain unless `required`.
async fn encrypt(
    mut s: TcpStream,
    host: &str,
    tls: &tokio_rustls::TlsConnector,
    required: bool,
) -> std::io::Result<Stream> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    s.write_all(&out).await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = ServerName::try_from(host.to_owned()).map_err(|_| {
                std::io::Error::other(format!("{host:?} is not a name TLS can check"))
            })?;
            let stream = tls.connect(name, s).await?;
            Ok(Stream::Tls(Box::new(stream)))
        }
        b'N' if !required => Ok(Stream::tcp(s)),
        b'N' => Err(std::io::Error::other(
            "the server does not offer TLS, which its admin URL's sslmode requires",
        )),
        _ => Err(std::io::Error::other(
            "the server answered the TLS request unexpectedly",
        )),
    }
}

/// TCP, TLS over TCP, or a Unix socket (the plain ones busy-poll while
/// the front door is nearly idle, see `wire::spin`).
pub(super) enum Stream {
    Tcp(Spinning<TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(Spinning<UnixStream>),
}

impl Stream {
    fn tcp(s: TcpStream) -> Self {
        Self::Tcp(Spinning::new(s, Side::Server))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why a login to a tenant server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server said no (its SQLSTATE and message).
    #[error("the tenant server refused: {1} ({0})")]
    Refused(String, String),
    #[error("could not reach the tenant server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the tenant server spoke unexpectedly: {0}")]
    Protocol(String),
    #[error("connecting to the tenant server timed out")]
    Timeout,
}

impl ConnectError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Refused(code, _) => Some(code),
            _ => None,
        }
    }
}

/// A logged-in connection to a tenant database.
/// What [`ServerConn::recv_or_send`] did.
pub enum Traffic {
    Frame(Option<Result<Msg, proto::FrameError>>),
    Sent(std::io::Result<()>),
}

pub struct ServerConn {
    reader: FramedRead<ReadHalf<Stream>, Codec>,
    writer: WriteHalf<Stream>,
    out: BytesMut,
    pub pid: i32,
    pub secret: i32,
    pub target: Target,
    /// Current values of the parameters the server reports.
    pub params: HashMap<String, String>,
    /// Their values at login (what `DISCARD ALL` returns them to).
    pub initial: HashMap<String, String>,
    /// Prepared statements it holds (silo's names for them), with when
    /// each was last used: at most `statement_cap`, the least recently
    /// used closed to make room.
    prepared: HashMap<String, u64>,
    uses: u64,
    pub statement_cap: usize,
    /// Written by [`ServerConn::recv_or_send`] and not flushed yet.
    unflushed: bool,
    pub id: u64,
    pub born: Instant,
    held: Held,
}

impl ServerConn {
    /// Log in to `database` as `user` with `password`, under `claim`.
    /// Messages from the server larger than `max_message` end the session
    /// that reads them (a client cannot make silo hold a 1 GiB row).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        claim: Claim,
        target: &Target,
        user: &str,
        password: &str,
        database: &str,
        max_message: usize,
        limit: Duration,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(
            limit,
            Self::login(claim, target, user, password, database, max_message),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
    }

    async fn login(
        claim: Claim,
        target: &Target,
        user: &str,
        password: &str,
        database: &str,
        max_message: usize,
    ) -> Result<Self, ConnectError> {
        let stream = target.open().await?;
        let (read, mut writer) = tokio::io::split(stream);
        let mut reader = FramedRead::new(read, Codec::server(max_message));
        let mut out = BytesMut::new();
        // A statement of a killed silo is cancelled by the server (as on
        // silo's other logins: see `servers::CLIENT_CHECK_INTERVAL`).
        let options = format!(
            "-c client_connection_check_interval={}",
            crate::servers::CLIENT_CHECK_INTERVAL
        );
        frontend::startup_message(
            [
                ("user", user),
                ("database", database),
                ("application_name", "silo-wire"),
                ("options", &options),
            ],
            &mut out,
        )
        .map_err(ConnectError::Io)?;
        writer.write_all(&out).await?;
        out.clear();
        let mut scram: Option<ScramSha256> = None;
        let mut params = HashMap::new();
        let (mut pid, mut secret) = (0, 0);
        loop {
            let m = next(&mut reader).await?;
            match m.tag {
                b'R' => {
                    let mut b = m.body();
                    let code = proto::get_i32(&mut b)
                        .ok_or_else(|| ConnectError::Protocol("short authentication".into()))?;
                    match code {
                        0 => {}
                        3 => frontend::password_message(password.as_bytes(), &mut out)?,
                        5 => {
                            let salt: [u8; 4] = b
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| ConnectError::Protocol("short md5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        10 => {
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut out,
                            )?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ConnectError::Protocol("SASL out of order".into())
                            })?;
                            s.update(b).map_err(ConnectError::Io)?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        12 => {
                            scram
                                .take()
                                .ok_or_else(|| ConnectError::Protocol("SASL out of order".into()))?
                                .finish(b)
                                .map_err(ConnectError::Io)?;
                        }
                        other => {
                            return Err(ConnectError::Protocol(format!(
                                "authentication method {other} is not supported"
                            )))
                        }
                    }
                    if !out.is_empty() {
                        writer.write_all(&out).await?;
                        out.clear();
                    }
                }
                b'S' => {
                    if let Some((k, rest)) = proto::split_cstr(m.body()) {
                        if let Some((v, _)) = proto::split_cstr(rest) {
                            params.insert(k.to_owned(), v.to_owned());
                        }
                    }
                }
                b'K' => {
                    let mut b = m.body();
                    pid = proto::get_i32(&mut b).unwrap_or(0);
                    secret = proto::get_i32(&mut b).unwrap_or(0);
                }
                b'E' => {
                    let (_, code, message) = proto::error_fields(m.body());
                    return Err(ConnectError::Refused(code, message));
                }
                b'N' => {}
                b'Z' => break,
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )))
                }
            }
        }
        // Which server run this backend belongs to: the budget's monitor
        // tells a restarted server's pids from the old ones by it.
        proto::query(&mut out, "SELECT pg_postmaster_start_time()::text");
        writer.write_all(&out).await?;
        out.clear();
        let mut started = None;
        loop {
            let m = next(&mut reader).await?;
            match m.tag {
                b'D' => {
                    let b = m.body();
                    if b.len() >= 6 {
                        let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
                        if len >= 0 && b.len() >= 6 + len as usize {
                            started = std::str::from_utf8(&b[6..6 + len as usize])
                                .ok()
                                .map(str::to_owned);
                        }
                    }
                }
                b'E' => {
                    let (_, code, message) = proto::error_fields(m.body());
                    return Err(ConnectError::Refused(code, message));
                }
                b'Z' => break,
                _ => {}
            }
        }
        let started =
            started.ok_or_else(|| ConnectError::Protocol("no postmaster start time".into()))?;
        let budget = claim_budget_id(&claim);
        let held = claim.connected(pid, started);
        Ok(Self {
            reader,
            writer,
            out,
            pid,
            secret,
            target: target.clone(),
            initial: params.clone(),
            params,
            prepared: HashMap::new(),
            uses: 0,
            statement_cap: usize::MAX,
            unflushed: false,
            id: budget,
            born: Instant::now(),
            held,
        })
    }

    /// Whether it holds statement `name`; a use of it, if so.
    pub fn holds(&mut self, name: &str) -> bool {
        self.uses += 1;
        match self.prepared.get_mut(name) {
            Some(used) => {
                *used = self.uses;
                true
            }
            None => false,
        }
    }

    /// It holds statement `name` now (its `ParseComplete` came).
    pub fn note_prepared(&mut self, name: String) {
        self.uses += 1;
        self.prepared.insert(name, self.uses);
    }

    /// It may no longer hold statement `name`.
    pub fn forget_prepared(&mut self, name: &str) {
        self.prepared.remove(name);
    }

    /// It may hold none of its statements any more.
    pub fn forget_all_prepared(&mut self) {
        self.prepared = HashMap::new();
    }

    /// Before another statement is prepared here, with `in_flight` more
    /// on their way: the least recently used one, forgotten, while that
    /// would make more than `statement_cap` (the caller closes it). A
    /// linear walk, only when full.
    pub fn evict_prepared(&mut self, in_flight: usize) -> Option<String> {
        if self.prepared.len() + in_flight < self.statement_cap {
            return None;
        }
        let oldest = self
            .prepared
            .iter()
            .min_by_key(|(_, used)| **used)
            .map(|(name, _)| name.clone())?;
        self.prepared.remove(&oldest);
        Some(oldest)
    }

    /// The least recently used statements beyond `statement_cap`,
    /// forgotten (the caller closes them).
    pub fn over_cap(&mut self) -> Vec<String> {
        let Some(over) = self.prepared.len().checked_sub(self.statement_cap) else {
            return Vec::new();
        };
        let mut by_use: Vec<(u64, String)> =
            self.prepared.iter().map(|(n, u)| (*u, n.clone())).collect();
        by_use.sort_unstable();
        by_use.truncate(over);
        for (_, name) in &by_use {
            self.prepared.remove(name);
        }
        by_use.into_iter().map(|(_, n)| n).collect()
    }

    /// The next message from the server (`None`: it closed the connection).
    pub async fn recv(&mut self) -> Result<Option<Msg>, proto::FrameError> {
        self.reader.next().await.transpose()
    }

    /// The next message, cancel-safe (for `select!`).
    pub async fn recv_frame(&mut self) -> Option<Result<Msg, proto::FrameError>> {
        self.reader.next().await
    }

    /// The next message, or what is queued sent (some of it): whichever
    /// comes first, cancel-safe. A connection written to while its answers
    /// are read (queries pipelined) must not stop reading to write: the
    /// server may be waiting for its answers to be taken before it reads.
    pub async fn recv_or_send(&mut self) -> Traffic {
        if self.out.is_empty() && !self.unflushed {
            return Traffic::Frame(self.reader.next().await);
        }
        // Through TLS what is written may wait in its buffer until flushed:
        // flushed as writes are, beside the reads (a flush dropped half
        // way is taken up again on the next call).
        let (writer, out) = (&mut self.writer, &self.out);
        let send = async move {
            if out.is_empty() {
                writer.flush().await.map(|()| None)
            } else {
                writer.write(out).await.map(Some)
            }
        };
        let sent = tokio::select! {
            biased;
            sent = send => sent,
            m = self.reader.next() => return Traffic::Frame(m),
        };
        Traffic::Sent(match sent {
            Ok(Some(0)) => Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Some(n)) => {
                self.out.advance(n);
                self.unflushed = true;
                Ok(())
            }
            Ok(None) => {
                self.unflushed = false;
                Ok(())
            }
            Err(e) => Err(e),
        })
    }

    /// Whether a whole message is already read and waiting.
    pub fn has_buffered_message(&self) -> bool {
        self.reader.decoder().has_message(self.reader.read_buffer())
    }

    /// Whether a message passed on in parts has more to come.
    pub fn mid_message(&self) -> bool {
        self.reader.decoder().mid_message()
    }

    /// Queue a frame to send.
    pub fn push(&mut self, frame: &[u8]) {
        self.out.extend_from_slice(frame);
    }

    /// Where frames to send are built.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Send what is queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let out = self.out.split();
            self.writer.write_all(&out).await?;
        }
        Ok(())
    }

    /// Whether the connection is still usable when idle: nothing arrived
    /// on it (a terminated backend sends an error and closes). No round trip.
    pub fn idle_ok(&mut self) -> bool {
        self.reader.next().now_or_never().is_none()
    }

    /// Run `sql` (simple protocol) and drop its results; `Err` with the
    /// server's message if it failed.
    pub async fn run_quietly(&mut self, sql: &str) -> Result<(), ConnectError> {
        proto::query(&mut self.out, sql);
        self.flush().await?;
        let mut failed = None;
        loop {
            let m = self
                .recv()
                .await
                .map_err(|e| ConnectError::Protocol(e.to_string()))?
                .ok_or_else(|| ConnectError::Protocol("the server closed the connection".into()))?;
            match m.tag {
                b'E' => {
                    let (_, code, message) = proto::error_fields(m.body());
                    failed = Some(ConnectError::Refused(code, message));
                }
                b'S' => self.note_parameter(&m),
                b'Z' => break,
                _ => {}
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Remember a `ParameterStatus` the server sent.
    pub fn note_parameter(&mut self, m: &Msg) {
        if let Some((k, rest)) = proto::split_cstr(m.body()) {
            if let Some((v, _)) = proto::split_cstr(rest) {
                self.params.insert(k.to_owned(), v.to_owned());
            }
        }
    }

    /// Say goodbye and close the socket; the permit goes back once the
    /// backend is seen gone.
    pub async fn close(mut self) {
        self.out.clear();
        self.out.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.writer.shutdown().await;
        })
        .await;
        let Self {
            reader,
            writer,
            held,
            ..
        } = self;
        drop(reader);
        drop(writer);
        drop(held);
    }

    pub fn budget(&self) -> &std::sync::Arc<crate::router::ServerBudget> {
        self.held.budget()
    }
}

fn claim_budget_id(claim: &Claim) -> u64 {
    claim.budget().next_conn_id()
}

async fn next(reader: &mut FramedRead<ReadHalf<Stream>, Codec>) -> Result<Msg, ConnectError> {
    match reader.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(ConnectError::Protocol(e.to_string())),
        None => Err(ConnectError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ))),
    }
}
