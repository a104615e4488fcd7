//! Shared server connections (`SILO_PG_SHARED_CONNECTIONS`): while a
//! tenant is busy, its clients' single reads between transactions run on
//! a few server connections at once, pipelined, instead of one client per
//! connection.
//!
//! A backend that finds its next query already waiting answers it without
//! sleeping and being woken for it; most of the cost of a short query on a
//! busy host is that sleep and wake-up, not the query. A *line* is one
//! such connection: a task of its own writes the queries given to it as
//! they come and hands each answer, in order, to the client that asked.
//!
//! Only what cannot leave anything behind on the connection is shared: a
//! simple query of one `SELECT` (see `session::sharable`), which runs as
//! a transaction of its own, so an error in it does not touch the queries
//! after it. Each answer must look like one such query's (see
//! [`Reading::check`]): one that does not (the text read otherwise than
//! silo read it) ends the line and every query on it, never hands one
//! client's answer to another. A line takes no more while the answer it
//! is reading is large (a big result is not queued behind), nor more than
//! [`MAX_DEPTH`] queries at once; the queries already behind a long one
//! wait for it, which is the price of sharing (and why it is off unless
//! asked for).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, Notify};

use super::backend::{Target, Traffic};
use super::pool::{Checkout, WirePool};
use super::proto;
use super::session::{tracked_sets, TRACKED};
use super::Ender;

/// Queries one line has been given and not answered yet, at most.
pub(super) const MAX_DEPTH: usize = 16;
/// Longest query text shared: what a line has written and the server not
/// read yet stays small.
pub(super) const MAX_QUERY: usize = 8 * 1024;
/// Answers are handed on in parts of about this size; a line takes no
/// more queries while the one it is reading has this much.
const PART: usize = 64 * 1024;
/// A client must take its answer at this rate at least, after
/// [`STALL`]: one that does not holds up every query behind it.
const STALL: Duration = Duration::from_secs(10);
const MIN_RATE: u64 = 1024 * 1024;
/// A line takes no more queries behind one the server has been on this
/// long without an answer.
const PATIENCE: Duration = Duration::from_millis(20);
/// A line with nothing to do gives its connection back after this long.
const LINGER: Duration = Duration::from_millis(50);
/// Longest a query waits for a line to be opened before it runs as usual.
const OPEN_WAIT: Duration = Duration::from_secs(1);

/// What a client gets back for a shared query.
pub(super) enum Answer {
    /// Part of the answer, more to come; `torn`: it ends inside a message.
    Part { bytes: Bytes, torn: bool },
    /// The rest of it, through its `ReadyForQuery`: the errors the server
    /// sent in the whole answer, the transaction status, and the settings
    /// it reported changed (`ParameterStatus`; the line ends after such
    /// an answer, as the queries behind it saw the change).
    Done {
        bytes: Bytes,
        errors: u32,
        status: u8,
        reported: Vec<Bytes>,
    },
    /// Never sent to the server: run it on a connection of its own.
    Retry,
    /// The connection ended before the answer did; the server's last
    /// word (a `FATAL` error) when it gave one.
    Lost(Option<Bytes>),
}

struct Job {
    query: Bytes,
    ticket: u64,
    reply: mpsc::Sender<Answer>,
    /// Ends its client's session (see [`Reading::hand`]).
    ender: Arc<Ender>,
}

/// What the sessions and cancel requests know of a line.
pub(super) struct LineState {
    /// Queries given and not answered yet.
    depth: AtomicUsize,
    /// The ticket whose answer is being read now (0: none).
    head: AtomicU64,
    /// The last ticket a cancel was sent to the server for (0: none): a
    /// query after it that the cancel reached instead runs again.
    cancelled: AtomicU64,
    /// The tracked settings it has (see `WirePool::settings_key`).
    settings: u64,
    /// Whether it takes more queries now (not while it reads a large
    /// answer, which may be read slowly).
    taking: AtomicBool,
    target: Target,
    pid: i32,
    secret: i32,
}

impl LineState {
    /// Cancel the query of `ticket` if it is the one whose answer the line
    /// is reading (the server is on it, or has gone on to the next,
    /// which then runs again: see [`Reading::check`]); `false`: it is not
    /// (its client is answered by silo, see `Ticket::cancel`).
    pub(super) fn cancel(&self, ticket: u64) -> bool {
        if self.head.load(Ordering::Acquire) != ticket {
            return false;
        }
        self.cancelled.store(ticket, Ordering::Release);
        let (target, pid, secret) = (self.target.clone(), self.pid, self.secret);
        tokio::spawn(async move {
            if let Err(e) = target.cancel(pid, secret).await {
                tracing::debug!("failed to forward a cancel request: {e}");
            }
        });
        true
    }
}

struct Line {
    jobs: mpsc::UnboundedSender<Job>,
    state: Arc<LineState>,
}

/// A pool's lines.
#[derive(Default)]
pub(super) struct Lines {
    open: Mutex<Vec<Line>>,
    /// Lines being opened now.
    opening: AtomicUsize,
}

/// A query given to a line: its answers, and what cancels it.
pub(super) struct Ticket {
    pub answers: mpsc::Receiver<Answer>,
    pub line: Arc<LineState>,
    pub id: u64,
    /// Told when a cancel request for it could not be sent to the server
    /// (it is queued behind another client's): its client is answered by
    /// silo, and its answer dropped.
    pub cancel: Arc<Notify>,
}

static TICKETS: AtomicU64 = AtomicU64::new(1);

impl Lines {
    /// Give `query` to the open line with the fewest queries, if one has room.
    fn give(&self, query: &Bytes, ender: &Arc<Ender>, settings: u64) -> Option<Ticket> {
        let open = self.open.lock().expect("lines lock");
        let line = open
            .iter()
            .filter(|l| l.state.settings == settings && l.state.taking.load(Ordering::Acquire))
            .min_by_key(|l| l.state.depth.load(Ordering::Relaxed))
            .filter(|l| l.state.depth.load(Ordering::Relaxed) < MAX_DEPTH)?;
        let (reply, answers) = mpsc::channel(4);
        let id = TICKETS.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            query: query.clone(),
            ticket: id,
            reply,
            ender: ender.clone(),
        };
        // Counted first: the line may answer it before this goes on.
        line.state.depth.fetch_add(1, Ordering::AcqRel);
        // Under the lock: a line leaves the list under it before it stops
        // taking jobs, so a job sent here is always read.
        if line.jobs.send(job).is_err() {
            line.state.depth.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Ticket {
            answers,
            line: line.state.clone(),
            id,
            cancel: Arc::new(Notify::new()),
        })
    }

    fn count(&self) -> usize {
        self.open.lock().expect("lines lock").len()
    }
}

/// A line being opened, counted until dropped.
struct Opening<'a>(&'a AtomicUsize);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Run `query` (a whole `Q` frame) on one of `pool`'s shared connections,
/// if the pool is busy enough to share (`lines` connections of it in use
/// at least) and a line for clients with the `wanted` settings has room,
/// or one can be opened; `None`: run it as usual. A pool keeps a
/// connection of its cap out of lines, for what is not shared.
pub(super) async fn submit(
    pool: &Arc<WirePool>,
    lines: usize,
    query: &Bytes,
    ender: &Arc<Ender>,
    wanted: &[(String, String)],
) -> Option<Ticket> {
    if !busy(pool, lines) {
        return None;
    }
    let lines = lines.min(pool.cap() - 1);
    let settings = pool.settings_key(wanted, TRACKED)?;
    if let Some(t) = pool.lines.give(query, ender, settings) {
        return Some(t);
    }
    // Every line full (or none yet for these settings): open one more if
    // there may be, on a connection at hand.
    let opening = pool.lines.opening.fetch_add(1, Ordering::AcqRel);
    let counted = Opening(&pool.lines.opening);
    let opened = pool.lines.count() + opening < lines
        && pool.has_room()
        && open(pool, wanted, settings).await;
    drop(counted);
    if opened {
        pool.lines.give(query, ender, settings)
    } else {
        None
    }
}

/// Whether `pool` shares now: open, with room for a line beside one
/// connection kept for what is not shared, and `lines` connections in use.
pub(super) fn busy(pool: &WirePool, lines: usize) -> bool {
    let lines = lines.min(pool.cap().saturating_sub(1));
    lines > 0 && !pool.is_closed() && pool.in_use() >= lines
}

/// Open a line on a connection of `pool` for clients with the `wanted`
/// tracked settings (`settings`, their key).
async fn open(pool: &Arc<WirePool>, wanted: &[(String, String)], settings: u64) -> bool {
    let Ok(mut checkout) = pool.acquire(Instant::now() + OPEN_WAIT).await else {
        return false;
    };
    // The tracked settings as its clients have them (their own, else the
    // server's at login, as the key has them), whatever a client before left.
    let initial = pool.initial_params().unwrap_or_default();
    let conn = checkout.conn();
    let sets = tracked_sets(wanted, &initial, &conn.params);
    if !sets.is_empty() {
        let sql = format!("SELECT {}", sets.join(", "));
        let set = conn.run_quietly(&sql);
        if !matches!(tokio::time::timeout(OPEN_WAIT, set).await, Ok(Ok(()))) {
            return false;
        }
    }
    let state = Arc::new(LineState {
        depth: AtomicUsize::new(0),
        head: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        settings,
        taking: AtomicBool::new(true),
        target: conn.target.clone(),
        pid: conn.pid,
        secret: conn.secret,
    });
    let (jobs, inbox) = mpsc::unbounded_channel();
    pool.lines.open.lock().expect("lines lock").push(Line {
        jobs,
        state: state.clone(),
    });
    metrics::counter!("silo_wire_shared_lines_total").increment(1);
    tokio::spawn(run(pool.clone(), checkout, state, inbox));
    true
}

/// How a line ended.
enum End {
    /// Idle, or its pool closed: the connection goes back.
    Done,
    /// The connection is lost, or its state unknown: closed.
    Broken,
}

/// The answer a line is reading, for the query at the head of its queue.
struct Reading {
    bytes: BytesMut,
    /// Its size so far, and what of it was handed on.
    read: usize,
    handed: u64,
    /// How long its client may still keep the line waiting to take a
    /// part: [`STALL`] at first, spent while it does not take it, earned
    /// back at [`MIN_RATE`] by what it takes, never above [`STALL`].
    allowance: Duration,
    errors: u32,
    /// Results ended (`CommandComplete`, `EmptyQueryResponse`).
    results: u32,
    /// Settings the server reported changed in it.
    reported: Vec<Bytes>,
    /// Cancelled by a cancel meant for the query before it: it runs again.
    again: bool,
    /// Its client was ended, or left: the rest is dropped.
    dropped: bool,
}

/// What a message of an answer means for the line.
enum Check {
    Fine,
    /// Not what one `SELECT` answers: the line cannot tell whose the
    /// messages after it are.
    Foreign,
    /// Its query was cancelled by a cancel meant for the query before it:
    /// run it again.
    Again,
}

impl Reading {
    fn new() -> Self {
        Self {
            bytes: BytesMut::new(),
            read: 0,
            handed: 0,
            allowance: STALL,
            errors: 0,
            results: 0,
            reported: Vec::new(),
            again: false,
            dropped: false,
        }
    }

    /// The next answer, in the same buffer.
    fn next(&mut self) -> Self {
        let mut next = Self::new();
        next.bytes = std::mem::take(&mut self.bytes);
        next.bytes.clear();
        next
    }

    /// Whether `m` (of the answer to `ticket`) is what one `SELECT` in a
    /// transaction of its own answers: rows, notices, one result or one
    /// error (after a result, as a failed commit), settings reported.
    fn check(&mut self, m: &proto::Msg, ticket: u64, line: &LineState) -> Check {
        match m.tag {
            b'T' | b'D' | b'N' | b'S' | proto::PART => Check::Fine,
            b'C' | b'I' => {
                self.results += 1;
                if self.results > 1 || self.errors > 0 {
                    Check::Foreign
                } else {
                    Check::Fine
                }
            }
            b'E' => {
                self.errors += 1;
                if self.errors > 1 {
                    return Check::Foreign;
                }
                let (_, code, message) = proto::error_fields(m.body());
                if code != "57014" || !message.contains("user request") {
                    return Check::Fine;
                }
                // A cancel's own error: whoever it was meant for, it is used.
                let cancelled = line.cancelled.swap(0, Ordering::AcqRel);
                if cancelled != 0 && cancelled != ticket && self.handed == 0 {
                    self.again = true;
                    return Check::Again;
                }
                Check::Fine
            }
            b'Z' => Check::Fine,
            _ => Check::Foreign,
        }
    }

    /// Hand `answer` to `job`'s client. One that keeps the line waiting
    /// longer than its allowance holds up every query behind it: it is
    /// ended, its query cancelled and the rest of its answer dropped; so
    /// is one that left.
    async fn hand(&mut self, job: &Job, line: &LineState, answer: Answer, size: usize) {
        if self.dropped {
            return;
        }
        let finished = !matches!(answer, Answer::Part { .. });
        let started = Instant::now();
        let sent = tokio::time::timeout(self.allowance, job.reply.send(answer)).await;
        self.handed += size as u64;
        let earned = Duration::from_secs_f64(size as f64 / MIN_RATE as f64);
        self.allowance = (self.allowance.saturating_sub(started.elapsed()) + earned).min(STALL);
        match sent {
            Ok(Ok(())) => return,
            Ok(Err(_)) => {}
            Err(_) => {
                metrics::counter!("silo_wire_refused_total", "reason" => "shared_stall")
                    .increment(1);
                job.ender.end(&format!(
                    "it did not take its answer on a shared server connection ({} s without a part, or less than {} MiB/s)",
                    STALL.as_secs(),
                    MIN_RATE / (1024 * 1024)
                ));
            }
        }
        self.dropped = true;
        if !finished {
            line.cancel(job.ticket);
        }
    }

    /// What is read so far, as a part to hand on.
    fn part(&mut self, torn: bool) -> (Answer, usize) {
        let bytes = self.bytes.split().freeze();
        let size = bytes.len();
        (Answer::Part { bytes, torn }, size)
    }
}

/// Takes a line out of its pool's list when its task ends, however it ends.
struct Leave<'a>(&'a WirePool, &'a Arc<LineState>);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0
            .lines
            .open
            .lock()
            .expect("lines lock")
            .retain(|l| !Arc::ptr_eq(&l.state, self.1));
    }
}

/// A line's task: write the queries given, hand each answer to its
/// client, until idle or broken.
async fn run(
    pool: Arc<WirePool>,
    mut checkout: Checkout,
    state: Arc<LineState>,
    mut inbox: mpsc::UnboundedReceiver<Job>,
) {
    let leave = Leave(&pool, &state);
    let mut waiting: VecDeque<Job> = VecDeque::with_capacity(MAX_DEPTH);
    let mut reading = Reading::new();
    // When the head's query became the one the server is on (about).
    let mut head_since = Instant::now();
    // Set when the line should take no more: a setting changed, or the
    // connection is as old as connections are kept, or it listens.
    let mut retiring = false;
    // The connection may hold session state: closed at the end.
    let mut spoilt = false;
    let lifetime = pool.max_lifetime();
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    let end = loop {
        if waiting.is_empty() && (retiring || pool.is_closed()) {
            break if spoilt { End::Broken } else { End::Done };
        }
        // Not queued behind what may take long: a large answer, or a
        // query the server has been on a while.
        let slow = !waiting.is_empty() && reading.read == 0 && head_since.elapsed() > PATIENCE;
        let taking = !retiring && reading.read < PART && !slow;
        if !taking && state.taking.swap(false, Ordering::AcqRel) {
            // Those given and not written yet run elsewhere.
            while let Ok(job) = inbox.try_recv() {
                let _ = job.reply.try_send(Answer::Retry);
                state.depth.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let conn = checkout.conn();
        tokio::select! {
            biased;
            t = conn.recv_or_send() => {
                let m = match t {
                    Traffic::Sent(Ok(())) => continue,
                    Traffic::Frame(Some(Ok(m))) => m,
                    Traffic::Sent(Err(_)) | Traffic::Frame(_) => break End::Broken,
                };
                if m.tag == b'A' {
                    // A notification: something on it listens (a function
                    // ran `LISTEN`). Dropped; the connection is not reused.
                    (retiring, spoilt) = (true, true);
                    continue;
                }
                let Some(head) = waiting.front() else {
                    // Nothing asked: a setting the server reports changed
                    // (its configuration reloaded), or its last word.
                    match m.tag {
                        b'S' => {
                            conn.note_parameter(&m);
                            retiring = true;
                            continue;
                        }
                        b'N' | proto::PART => continue,
                        _ => break End::Broken,
                    }
                };
                if m.tag == b'E' {
                    let (severity, _, _) = proto::error_fields(m.body());
                    if matches!(severity.as_str(), "FATAL" | "PANIC") {
                        if !reading.bytes.is_empty() {
                            let (part, size) = reading.part(false);
                            reading.hand(head, &state, part, size).await;
                        }
                        let size = m.frame.len();
                        reading.hand(head, &state, Answer::Lost(Some(m.frame)), size).await;
                        waiting.pop_front();
                        break End::Broken;
                    }
                }
                match reading.check(&m, head.ticket, &state) {
                    Check::Fine | Check::Again => {}
                    Check::Foreign => {
                        metrics::counter!("silo_wire_shared_broken_total").increment(1);
                        tracing::warn!(tag = m.tag, "a shared server connection sent what one SELECT does not answer: it is closed, its queries run again elsewhere");
                        break End::Broken;
                    }
                }
                if m.tag == b'S' {
                    conn.note_parameter(&m);
                    reading.reported.push(m.frame.clone());
                    retiring = true;
                }
                reading.read += m.frame.len();
                if !reading.dropped {
                    reading.bytes.extend_from_slice(&m.frame);
                }
                if m.tag == b'Z' {
                    let status = m.body().first().copied().unwrap_or(b'I');
                    let job = waiting.pop_front().expect("a head");
                    head_since = Instant::now();
                    if checkout.conn().born.elapsed() >= lifetime {
                        retiring = true;
                    }
                    if reading.again && status == b'I' && reading.reported.is_empty() {
                        reading = reading.next();
                        if job.reply.is_closed() {
                            state.depth.fetch_sub(1, Ordering::AcqRel);
                        } else {
                            // Cancelled for another's sake: to the back of the line.
                            metrics::counter!("silo_wire_shared_reruns_total").increment(1);
                            checkout.conn().push(&job.query);
                            waiting.push_back(job);
                        }
                        state.head.store(waiting.front().map_or(0, |j| j.ticket), Ordering::Release);
                        continue;
                    }
                    let reported = std::mem::take(&mut reading.reported);
                    let changed = !reported.is_empty();
                    let bytes = reading.bytes.split().freeze();
                    let size = bytes.len();
                    let errors = reading.errors;
                    let done = Answer::Done { bytes, errors, status, reported };
                    reading.hand(&job, &state, done, size).await;
                    reading = reading.next();
                    state.depth.fetch_sub(1, Ordering::AcqRel);
                    state.head.store(waiting.front().map_or(0, |j| j.ticket), Ordering::Release);
                    state.taking.store(!retiring, Ordering::Release);
                    metrics::counter!("silo_wire_shared_queries_total").increment(1);
                    if status != b'I' || (changed && !waiting.is_empty()) {
                        // A transaction left open (cannot be, for one
                        // `SELECT`; never trusted), or a setting changed
                        // under the queries behind: they run again elsewhere.
                        break End::Broken;
                    }
                    if waiting.is_empty() {
                        linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
                    }
                } else if reading.bytes.len() >= PART && !reading.again {
                    let (part, size) = reading.part(conn.mid_message());
                    reading.hand(head, &state, part, size).await;
                }
            }
            job = inbox.recv(), if taking && waiting.len() < MAX_DEPTH => {
                let Some(job) = job else {
                    break if waiting.is_empty() { End::Done } else { End::Broken };
                };
                let slow = !waiting.is_empty() && reading.read == 0 && head_since.elapsed() > PATIENCE;
                if pool.is_closed() || slow {
                    let _ = job.reply.try_send(Answer::Retry);
                    state.depth.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                if job.reply.is_closed() {
                    // Its client is gone (ended, or answered by silo).
                    state.depth.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                conn.push(&job.query);
                if waiting.is_empty() {
                    head_since = Instant::now();
                    state.head.store(job.ticket, Ordering::Release);
                }
                waiting.push_back(job);
            }
            () = &mut linger, if waiting.is_empty() => break End::Done,
        }
    };
    // Out of the list first: no job is given to it after this, and those
    // given before are in its inbox.
    drop(leave);
    inbox.close();
    while let Ok(job) = inbox.try_recv() {
        let _ = job.reply.try_send(Answer::Retry);
    }
    // Those behind the head that the server has not answered: each one
    // `SELECT`, run again elsewhere (if the server ran it, it ran it in a
    // transaction of its own that nothing saw).
    let mut waiting = waiting.into_iter();
    if let Some(head) = waiting.next() {
        let lost = if reading.handed == 0 && !reading.dropped {
            Answer::Retry
        } else {
            Answer::Lost(None)
        };
        let _ = head.reply.try_send(lost);
    }
    for job in waiting {
        let _ = job.reply.try_send(Answer::Retry);
    }
    state.head.store(0, Ordering::Release);
    match end {
        End::Done => checkout.release(),
        End::Broken => drop(checkout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> proto::Msg {
        let mut frame = vec![tag];
        frame.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        frame.extend_from_slice(body);
        proto::Msg {
            tag,
            frame: Bytes::from(frame),
        }
    }

    fn error(code: &str, message: &str) -> proto::Msg {
        let mut body = Vec::new();
        for (f, v) in [(b'S', "ERROR"), (b'C', code), (b'M', message)] {
            body.push(f);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        msg(b'E', &body)
    }

    fn line() -> LineState {
        LineState {
            depth: AtomicUsize::new(0),
            head: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            settings: 0,
            taking: AtomicBool::new(true),
            target: Target::Unix("/nowhere".into()),
            pid: 0,
            secret: 0,
        }
    }

    /// Each message of an answer in turn; the last check.
    fn checks(line: &LineState, ticket: u64, answer: &[proto::Msg]) -> Vec<&'static str> {
        let mut r = Reading::new();
        answer
            .iter()
            .map(|m| match r.check(m, ticket, line) {
                Check::Fine => "fine",
                Check::Foreign => "foreign",
                Check::Again => "again",
            })
            .collect()
    }

    #[test]
    fn only_what_one_select_answers_is_taken_for_its_answer() {
        let l = line();
        let (t, d, c) = (msg(b'T', b""), msg(b'D', b""), msg(b'C', b"SELECT 1\0"));
        let z = msg(b'Z', b"I");
        assert_eq!(
            checks(&l, 1, &[t.clone(), d.clone(), c.clone(), z.clone()]),
            ["fine"; 4]
        );
        assert_eq!(
            checks(&l, 1, &[error("22012", "division by zero"), z.clone()]),
            ["fine"; 2]
        );
        // Two results, a copy, a result after an error: not one SELECT's.
        assert_eq!(checks(&l, 1, &[c.clone(), c.clone()])[1], "foreign");
        assert_eq!(checks(&l, 1, &[msg(b'G', b"")])[0], "foreign");
        assert_eq!(
            checks(&l, 1, &[error("22012", "x"), c.clone()])[1],
            "foreign"
        );
        // A cancel meant for ticket 1 that reached ticket 2: 2 runs again,
        // once; 1's own cancel is 1's.
        let cancel = error("57014", "canceling statement due to user request");
        l.cancelled.store(1, Ordering::Release);
        assert_eq!(checks(&l, 2, std::slice::from_ref(&cancel)), ["again"]);
        assert_eq!(checks(&l, 2, std::slice::from_ref(&cancel)), ["fine"]);
        l.cancelled.store(1, Ordering::Release);
        assert_eq!(checks(&l, 1, std::slice::from_ref(&cancel)), ["fine"]);
        assert_eq!(l.cancelled.load(Ordering::Acquire), 0);
        // A statement timeout is no one's cancel.
        l.cancelled.store(1, Ordering::Release);
        let timeout = error("57014", "canceling statement due to statement timeout");
        assert_eq!(checks(&l, 2, &[timeout]), ["fine"]);
    }
}
