//! Busy-polling while the front door is nearly idle.
//!
//! With one client, a round trip through silo wakes silo twice (the
//! client's query, the server's answer), and each wake-up of a parked
//! thread costs about as much as the work it wakes for. So while at most
//! one server connection is checked out across the whole front door, a
//! session that waits for the side it expects to speak next (the server
//! while it owes an answer, the client otherwise) reads that socket
//! without blocking for up to `SILO_PG_SPIN_MICROS` before parking as usual.
//! Under load there are many checkouts and nobody spins: the CPU is
//! PostgreSQL's. A spin also stops as soon as another session handles a
//! message: a thread spinning then would hold up the work queued behind
//! it, and take a CPU that PostgreSQL or the clients need.
//!
//! The reads go to the socket itself (`socket2`), not through tokio's
//! readiness, which only the thread that holds the I/O driver updates.
//! Bytes read so are the same bytes tokio would have read: its readiness
//! may then be stale, which costs it one `WouldBlock`.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The side a session waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Server,
}

thread_local! {
    /// Set while a session's wait is polled (see [`Expecting`]): the side
    /// it waits for, and how long a read of it may spin.
    static EXPECTING: Cell<Option<(Side, u32)>> = const { Cell::new(None) };
}

/// Server connections checked out by clients right now, in the whole
/// process (its CPUs are what spinning spends).
static CHECKED_OUT: AtomicUsize = AtomicUsize::new(0);

/// One checked-out server connection, counted while it lives.
pub(super) struct CheckedOut(());

impl CheckedOut {
    pub(super) fn new() -> Self {
        CHECKED_OUT.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Drop for CheckedOut {
    fn drop(&mut self) {
        CHECKED_OUT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The first branch of a session's `biased` `select!` of its wait:
/// until [`Unexpect`] (its last branch) or [`clear`] (after it), reads of
/// `side` may spin up to `window` each (`Duration::ZERO`: not at all). It
/// never completes.
///
/// Branches, not a future wrapping the `select!`: such a wrapper grows
/// every waiting session's task by a third (10,000 idle clients).
pub(super) fn expect(side: Side, window: Duration) -> Expect {
    let micros = u32::try_from(window.as_micros()).unwrap_or(u32::MAX);
    Expect { side, micros }
}

pub(super) struct Expect {
    side: Side,
    micros: u32,
}

impl Future for Expect {
    type Output = Infallible;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Infallible> {
        EXPECTING.with(|e| e.set(Some((self.side, self.micros))));
        Poll::Pending
    }
}

/// The last branch of that `select!`: reads spin no more once every
/// branch is pending (and the task yields). It never completes.
pub(super) struct Unexpect;

impl Future for Unexpect {
    type Output = Infallible;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Infallible> {
        clear();
        Poll::Pending
    }
}

/// Reads spin no more: called when a branch of that `select!` completed.
pub(super) fn clear() {
    EXPECTING.with(|e| e.set(None));
}

/// Until when a read of `side` may spin, if it may.
fn deadline(side: Side) -> Option<Instant> {
    match EXPECTING.with(Cell::get) {
        Some((expected, micros)) if expected == side && micros > 0 && alone() => {
            Some(Instant::now() + Duration::from_micros(micros.into()))
        }
        _ => None,
    }
}

/// At most one server connection is checked out in the process.
fn alone() -> bool {
    CHECKED_OUT.load(Ordering::Relaxed) <= 1
}

/// Messages sessions have handled (see [`note_activity`]).
static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// Reads spinning right now.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// A session handled a message (a login's too): anyone spinning stops, as
/// the front door has other work. With nobody spinning (any load) this
/// only reads a line no one writes, not a counter every message bumps.
pub(super) fn note_activity() {
    if SPINNING.load(Ordering::Relaxed) > 0 {
        ACTIVITY.fetch_add(1, Ordering::Relaxed);
    }
}

/// One read spinning, counted while it lives.
struct Spinner;

impl Spinner {
    fn new() -> Self {
        SPINNING.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The spin window a front door uses: none with fewer than two CPUs to
/// run on, where a spinning thread would only hold the CPU that the
/// server or the client it waits for needs.
pub(super) fn window(configured: Duration, cpus: usize) -> Duration {
    if cpus < 2 {
        Duration::ZERO
    } else {
        configured
    }
}

/// How a spin ended.
enum Spun {
    Read(std::io::Result<()>),
    /// Nothing came before the deadline.
    Missed,
    /// Another session handled a message, or took a server connection:
    /// the front door is not idle, and this thread is better parked.
    Busy,
}

/// Read `socket` without blocking until bytes (or its end, or an error)
/// come, `until` passes, or another session is busy.
fn read_until<S: AsFd>(socket: &S, buf: &mut ReadBuf<'_>, until: Instant) -> Spun {
    if buf.remaining() == 0 {
        return Spun::Read(Ok(()));
    }
    let _spinning = Spinner::new();
    let activity = ACTIVITY.load(Ordering::Relaxed);
    let sock = socket2::SockRef::from(socket);
    let want = buf.remaining().min(16 * 1024);
    let room = buf.initialize_unfilled_to(want);
    let mut spins = 0u32;
    loop {
        match (&*sock).read(room) {
            Ok(n) => {
                buf.advance(n);
                return Spun::Read(Ok(()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Spun::Read(Err(e)),
        }
        if ACTIVITY.load(Ordering::Relaxed) != activity || !alone() {
            return Spun::Busy;
        }
        spins += 1;
        // The clock is read every few tries, not every one.
        if spins % 4 == 0 && Instant::now() >= until {
            return Spun::Missed;
        }
        std::hint::spin_loop();
    }
}

/// A socket whose reads may spin: a client's (it speaks next when the
/// server owes nothing) or a server connection's.
///
/// A new socket sits out its first waits ([`FIRST_SKIP`]). Then each
/// backs off on its own: a spin that ends with nothing read
/// doubles the number of waits it sits out (up to 64), and one that reads
/// something ends that. A client that pauses between its messages (most
/// apps) or a server running slow statements costs a spin now and then,
/// not one per message.
pub(super) struct Spinning<S> {
    io: S,
    side: Side,
    /// Waits still to sit out, and how many the next miss sits out.
    skip: u8,
    next_skip: u8,
}

impl<S> Spinning<S> {
    pub(super) fn new(io: S, side: Side) -> Self {
        Self {
            io,
            side,
            skip: FIRST_SKIP,
            next_skip: 1,
        }
    }
}

impl<S: AsFd + AsyncRead + Unpin> AsyncRead for Spinning<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(until) = deadline(this.side) {
            if this.skip > 0 {
                this.skip -= 1;
            } else {
                let spun = read_until(&this.io, buf, until);
                // How spins end, for operators weighing the knob (only
                // counted while spinning, that is under light traffic).
                let outcome = match spun {
                    Spun::Read(_) => "read",
                    Spun::Missed => "missed",
                    Spun::Busy => "busy",
                };
                metrics::counter!("silo_wire_spins_total", "outcome" => outcome).increment(1);
                match spun {
                    Spun::Read(read) => {
                        this.next_skip = 1;
                        return Poll::Ready(read);
                    }
                    Spun::Missed => {
                        this.skip = this.next_skip;
                        this.next_skip = this.next_skip.saturating_mul(2).min(MAX_SKIP);
                    }
                    Spun::Busy => {}
                }
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

/// Waits a new socket sits out: a connection earns its spins by being
/// busy. A client that connects for one transaction (a `-C` storm, an app
/// without a pool) would otherwise spin for its first query and for its
/// goodbye, and a storm of them spent a fifth more CPU per transaction.
const FIRST_SKIP: u8 = 2;

/// The most waits a socket sits out after spinning in vain.
const MAX_SKIP: u8 = 64;

impl<S: AsyncWrite + Unpin> AsyncWrite for Spinning<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    /// The checkout count is the process's: these tests take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// One poll of a read of `s` while its session waits for `side`.
    fn poll_once(s: &mut Spinning<UnixStream>, side: Side, window: Duration) -> Poll<Vec<u8>> {
        let mut room = [0u8; 64];
        let mut buf = ReadBuf::new(&mut room);
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut expect(side, window)).poll(&mut cx);
        let read = Pin::new(&mut *s).poll_read(&mut cx, &mut buf);
        let _ = Pin::new(&mut Unexpect).poll(&mut cx);
        assert_eq!(EXPECTING.with(Cell::get), None);
        match read {
            Poll::Ready(r) => {
                r.expect("read");
                Poll::Ready(buf.filled().to_vec())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// A wait that may spin 5 s ends long before, and not as a miss.
    fn waits_without_spinning_long(a: &mut Spinning<UnixStream>, why: &str) {
        let started = Instant::now();
        let read = poll_once(a, Side::Client, Duration::from_secs(5));
        assert_eq!(read, Poll::Pending, "{why}");
        assert!(started.elapsed() < Duration::from_secs(5), "{why}");
        assert_eq!((a.skip, a.next_skip), (0, 1), "{why}");
    }

    #[tokio::test]
    async fn a_read_spins_only_for_the_side_expected_and_backs_off_after_spinning_in_vain() {
        let _turn = TURN.lock().await;
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut a = Spinning::new(a, Side::Server);
        let window = Duration::from_millis(2);

        // A new socket sits out its first waits: no spin, and no miss.
        let started = Instant::now();
        for _ in 0..FIRST_SKIP {
            assert_eq!(
                poll_once(&mut a, Side::Server, Duration::from_secs(5)),
                Poll::Pending
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((a.skip, a.next_skip), (0, 1));

        // Bytes already there are read by the spin, at once.
        b.write_all(b"hello").await.unwrap();
        assert_eq!(
            poll_once(&mut a, Side::Server, window),
            Poll::Ready(b"hello".to_vec())
        );

        // Nothing there: the spin gives up after its window, and the read
        // parks as usual.
        let started = Instant::now();
        assert_eq!(poll_once(&mut a, Side::Server, window), Poll::Pending);
        assert!(started.elapsed() >= window, "spun {:?}", started.elapsed());
        assert_eq!((a.skip, a.next_skip), (1, 2));
        // The next wait is sat out (no spin), the one after spins again
        // and, in vain, doubles what the next miss sits out.
        assert_eq!(poll_once(&mut a, Side::Server, window), Poll::Pending);
        assert_eq!((a.skip, a.next_skip), (0, 2));
        assert_eq!(poll_once(&mut a, Side::Server, window), Poll::Pending);
        assert_eq!((a.skip, a.next_skip), (2, 4));
        for _ in 0..2 {
            assert_eq!(poll_once(&mut a, Side::Server, window), Poll::Pending);
        }
        // A spin that reads something ends the backing off.
        b.write_all(b"again").await.unwrap();
        assert_eq!(
            poll_once(&mut a, Side::Server, window),
            Poll::Ready(b"again".to_vec())
        );
        assert_eq!((a.skip, a.next_skip), (0, 1));

        // Waiting for the other side, or with no window: no spin, and no
        // backing off either.
        let started = Instant::now();
        assert_eq!(
            poll_once(&mut a, Side::Client, Duration::from_secs(5)),
            Poll::Pending
        );
        assert_eq!(
            poll_once(&mut a, Side::Server, Duration::ZERO),
            Poll::Pending
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((a.skip, a.next_skip), (0, 1));

        // The backing off stops at 64 waits.
        for _ in 0..20 {
            a.skip = 0;
            assert_eq!(
                poll_once(&mut a, Side::Server, Duration::from_micros(1)),
                Poll::Pending
            );
        }
        assert_eq!((a.skip, a.next_skip), (MAX_SKIP, MAX_SKIP));

        // The peer's end is read as the end.
        a.skip = 0;
        drop(b);
        assert_eq!(
            poll_once(&mut a, Side::Server, window),
            Poll::Ready(Vec::new())
        );
    }

    #[test]
    fn a_process_with_one_cpu_never_spins() {
        let configured = Duration::from_micros(50);
        assert_eq!(window(configured, 1), Duration::ZERO);
        assert_eq!(window(configured, 0), Duration::ZERO);
        assert_eq!(window(configured, 2), configured);
    }

    #[tokio::test]
    async fn nobody_spins_while_two_server_connections_are_checked_out_or_another_session_is_busy()
    {
        let _turn = TURN.lock().await;
        let (a, _b) = UnixStream::pair().unwrap();
        let mut a = Spinning::new(a, Side::Client);
        a.skip = 0;
        let busy = (CheckedOut::new(), CheckedOut::new());
        waits_without_spinning_long(&mut a, "no spin, so no miss");
        drop(busy);

        // A spin stops when another session handles a message, and that
        // is not a miss either.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = std::thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    note_activity();
                }
            }
        });
        waits_without_spinning_long(&mut a, "given up, not missed");
        stop.store(true, Ordering::Relaxed);
        other.join().unwrap();
    }
}
