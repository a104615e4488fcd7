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
//! after it. A line takes no more while the answer it is reading is large
//! (a big result is not queued behind), nor more than [`MAX_DEPTH`]
//! queries at once; the queries already behind a long one wait for it,
//! which is the price of sharing (and why it is off unless asked for).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::backend::{Target, Traffic};
use super::pool::{Checkout, WirePool};
use super::proto;
use super::session::{set_config, TRACKED};
use super::Ender;

/// Queries one line has been given and not answered yet, at most.
pub(super) const MAX_DEPTH: usize = 16;
/// Longest query text shared: what a line has written and the server not
/// read yet stays small (the answers are read meanwhile all the same).
pub(super) const MAX_QUERY: usize = 8 * 1024;
/// Answers are handed on in parts of about this size; a line takes no
/// more queries while the one it is reading has this much.
const PART: usize = 64 * 1024;
/// Longest a line waits for a client to take part of its answer.
const STALL: Duration = Duration::from_secs(10);
/// Longest a query waits for a line to be opened before it runs as usual.
const OPEN_WAIT: Duration = Duration::from_secs(1);
/// A line with nothing to do gives its connection back after this long.
const LINGER: Duration = Duration::from_millis(50);

/// What a client gets back for a shared query.
pub(super) enum Answer {
    /// Part of the answer, more to come.
    Part(Bytes),
    /// The rest of it, through its `ReadyForQuery`, with the errors the
    /// server sent in the whole answer and the transaction status.
    Done {
        bytes: Bytes,
        errors: u32,
        status: u8,
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
    /// Cancel the query of `ticket` if it is the one the server is on.
    /// Another client's query may have started just after the check: the
    /// same race PostgreSQL's own cancel has between a client's queries,
    /// here between the tenant's clients on a line.
    pub(super) fn cancel(&self, ticket: u64) {
        if self.head.load(Ordering::Acquire) != ticket {
            return;
        }
        let (target, pid, secret) = (self.target.clone(), self.pid, self.secret);
        tokio::spawn(async move {
            if let Err(e) = target.cancel(pid, secret).await {
                tracing::debug!("failed to forward a cancel request: {e}");
            }
        });
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
        })
    }

    fn count(&self) -> usize {
        self.open.lock().expect("lines lock").len()
    }
}

/// Run `query` (a whole `Q` frame) on one of `pool`'s shared connections,
/// if the pool is busy enough to share (`lines` connections of it in use
/// at least) and a line has room or one can be opened at once; `None`:
/// run it as usual.
pub(super) async fn submit(
    pool: &Arc<WirePool>,
    lines: usize,
    query: &Bytes,
    ender: &Arc<Ender>,
    wanted: &[(String, String)],
) -> Option<Ticket> {
    if pool.is_closed() || pool.in_use() < lines {
        return None;
    }
    let settings = pool.settings_key(wanted, TRACKED)?;
    if let Some(t) = pool.lines.give(query, ender, settings) {
        return Some(t);
    }
    // Every line full (or none yet): open one more if there may be.
    let opening = pool.lines.opening.fetch_add(1, Ordering::AcqRel);
    let opened = if pool.lines.count() + opening < lines {
        open(pool, wanted, settings).await
    } else {
        false
    };
    pool.lines.opening.fetch_sub(1, Ordering::AcqRel);
    if opened {
        pool.lines.give(query, ender, settings)
    } else {
        None
    }
}

/// Open a line on a connection of `pool` (waiting at most [`OPEN_WAIT`])
/// for clients with the `wanted` tracked settings.
async fn open(pool: &Arc<WirePool>, wanted: &[(String, String)], settings: u64) -> bool {
    let Ok(mut checkout) = pool.acquire(Instant::now() + OPEN_WAIT).await else {
        return false;
    };
    let conn = checkout.conn();
    // The tracked settings as its clients have them (their own, else the
    // server's at login), whatever a client before left.
    let sets: Vec<String> = TRACKED
        .iter()
        .filter_map(|k| {
            let want = wanted
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .or_else(|| conn.initial.get(*k))?;
            (conn.params.get(*k) != Some(want)).then(|| set_config(k, want))
        })
        .collect();
    if !sets.is_empty()
        && conn
            .run_quietly(&format!("SELECT {}", sets.join(", ")))
            .await
            .is_err()
    {
        return false;
    }
    let state = Arc::new(LineState {
        depth: AtomicUsize::new(0),
        head: AtomicU64::new(0),
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
#[derive(Default)]
struct Reading {
    bytes: BytesMut,
    /// Its size so far, and the errors in it.
    read: usize,
    errors: u32,
    /// Its client was ended for not taking it: the rest is dropped.
    dropped: bool,
}

impl Reading {
    /// Hand `answer` to `job`'s client. One that has not taken what it
    /// was given within [`STALL`] holds up every query behind it: it is
    /// ended, and the rest of its answer dropped.
    async fn hand(&mut self, job: &Job, answer: Answer) {
        if self.dropped {
            return;
        }
        if tokio::time::timeout(STALL, job.reply.send(answer))
            .await
            .is_err()
        {
            metrics::counter!("silo_wire_refused_total", "reason" => "shared_stall").increment(1);
            job.ender.end(&format!(
                "it did not read its answer on a shared server connection for {} s",
                STALL.as_secs()
            ));
            self.dropped = true;
        }
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
    let mut waiting: VecDeque<Job> = VecDeque::with_capacity(MAX_DEPTH);
    let mut reading = Reading::default();
    // Set when the server reports a setting changed: the line takes no more.
    let mut retiring = false;
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    let end = loop {
        if waiting.is_empty() && (retiring || pool.is_closed()) {
            break End::Done;
        }
        let taking = !retiring && reading.read < PART;
        if !taking && state.taking.swap(false, Ordering::AcqRel) {
            // Not queued behind what may take long: those given and not
            // written yet run elsewhere.
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
                let Some(head) = waiting.front() else {
                    // Nothing asked: a setting the server reports changed
                    // (its configuration reloaded), or its last word.
                    match m.tag {
                        b'S' => {
                            conn.note_parameter(&m);
                            retiring = true;
                            continue;
                        }
                        b'N' => continue,
                        _ => break End::Broken,
                    }
                };
                match m.tag {
                    b'E' => {
                        reading.errors += 1;
                        let (severity, _, _) = proto::error_fields(m.body());
                        if matches!(severity.as_str(), "FATAL" | "PANIC") {
                            if !reading.bytes.is_empty() {
                                let part = Answer::Part(reading.bytes.split().freeze());
                                reading.hand(head, part).await;
                            }
                            reading.hand(head, Answer::Lost(Some(m.frame))).await;
                            waiting.pop_front();
                            break End::Broken;
                        }
                    }
                    b'S' => {
                        conn.note_parameter(&m);
                        retiring = true;
                    }
                    _ => {}
                }
                reading.read += m.frame.len();
                if !reading.dropped {
                    reading.bytes.extend_from_slice(&m.frame);
                }
                if m.tag == b'Z' {
                    let status = m.body().first().copied().unwrap_or(b'I');
                    let done = Answer::Done {
                        bytes: reading.bytes.split().freeze(),
                        errors: reading.errors,
                        status,
                    };
                    reading.hand(head, done).await;
                    reading = Reading { bytes: reading.bytes, ..Reading::default() };
                    waiting.pop_front();
                    state.depth.fetch_sub(1, Ordering::AcqRel);
                    state.head.store(waiting.front().map_or(0, |j| j.ticket), Ordering::Release);
                    state.taking.store(!retiring, Ordering::Release);
                    metrics::counter!("silo_wire_shared_queries_total").increment(1);
                    if status != b'I' {
                        // A transaction left open: what follows would run
                        // in it. Cannot be, for one `SELECT`; never trusted.
                        break End::Broken;
                    }
                    if waiting.is_empty() {
                        linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
                    }
                } else if reading.bytes.len() >= PART {
                    let part = Answer::Part(reading.bytes.split().freeze());
                    reading.hand(head, part).await;
                }
            }
            job = inbox.recv(), if taking && waiting.len() < MAX_DEPTH => {
                let Some(job) = job else {
                    break if waiting.is_empty() { End::Done } else { End::Broken };
                };
                if pool.is_closed() {
                    let _ = job.reply.try_send(Answer::Retry);
                    state.depth.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                conn.push(&job.query);
                if waiting.is_empty() {
                    state.head.store(job.ticket, Ordering::Release);
                }
                waiting.push_back(job);
            }
            () = &mut linger, if waiting.is_empty() => break End::Done,
        }
    };
    // Out of the list first: no job is given to it after this, and those
    // given before are in its inbox.
    pool.lines
        .open
        .lock()
        .expect("lines lock")
        .retain(|l| !Arc::ptr_eq(&l.state, &state));
    inbox.close();
    while let Ok(job) = inbox.try_recv() {
        let _ = job.reply.try_send(Answer::Retry);
    }
    for job in waiting {
        let _ = job.reply.try_send(Answer::Lost(None));
    }
    state.head.store(0, Ordering::Release);
    match end {
        End::Done => checkout.release(),
        End::Broken => drop(checkout),
    }
}
