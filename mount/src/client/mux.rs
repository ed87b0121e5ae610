//! The multiplexed connection: many requests in flight on one TLS connection, matched to their
//! answers by id, and a supervisor that brings the connection back when it dies.
//!
//! - [`Conn`] is one TLS connection: a pending map of `oneshot`s keyed by request id (a std
//!   `Mutex`, never held across an await), the write half behind an async `Mutex`, and a reader
//!   task that completes the oneshots. A request finding the writer idle and nothing queued
//!   writes its frame itself (no hop to another task: what a lone request, e.g. a 4 KiB random
//!   read, waits for); otherwise it queues on a bounded channel, and a writer task writes the
//!   queue through the `BufWriter`, flushing when it is empty so that bursts share TLS records.
//!   When the connection dies, every waiter wakes at once (as sshfs's `clean_req`).
//! - A request may also leave a callback instead of a oneshot ([`Conn::request_detached`]): the
//!   reader task calls it with the answer, so the caller's thread need not wait, and the answer
//!   is used (a FUSE reply written) without a wake-up of another thread. Every callback is called
//!   exactly once: with the answer, `Lost` when the connection dies, or `TimedOut` (the reader
//!   sweeps them every [`SWEEP_EVERY`]) after [`REPLY_TIMEOUT`].
//! - [`Mux`] holds the current connection in a `watch` channel. Its supervisor task sends a
//!   keepalive `Ping` when the connection has been idle, and after a loss reconnects with backoff
//!   (100 ms doubling to 5 s) and logs in again with the session token, never the password.

use bytes::Bytes;
use futures::StreamExt as _;
use homefs_shared::frame::write_frame;
use homefs_shared::{
    ErrorCode, Request, RequestHeader, RequestId, Response, Token, WireError, WirePath, MAX_FRAME_BYTES, NOTICE_ID,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::{frame_io, with_timeout, Dialer, Reader, Transport, Writer, WRITE_TIMEOUT};
use super::ConnectError;

/// Frames queued for the writer task. Callers wait here when the socket is slower than they are;
/// 64 frames of up to 4 MiB bound the memory, and 64 matches the server's per-session in-flight
/// default, so a full pipeline never waits on this queue alone.
const WRITE_QUEUE: usize = 64;
/// A connection without any frame received for this long is probed with a `Ping`: this keeps
/// the server's idle timeout (300 s by default) from closing a mount with open files, and finds
/// half-open connections. [`Mux::set_keepalive`] changes it.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// How long the keepalive `Ping` may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest a request waits for its answer on a live connection. Generous: a lock request
/// waits up to ~10 s on the server, and a 4 MiB write can crawl on a slow link.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the reader looks for detached requests past [`REPLY_TIMEOUT`].
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The first delay between reconnect attempts; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An answer: the server's result and the frame's data.
pub(crate) type Reply = (Result<Response, WireError>, Bytes);

/// Called once with a detached request's answer, or why there is none ([`Conn::request_detached`]).
/// It runs on the connection's reader task (or on the thread that found the connection dead): it
/// must not wait.
pub(crate) type ReplyFn = Box<dyn FnOnce(Result<Reply, SendError>) + Send>;

/// Who waits for an answer.
enum Waiter {
    /// A task in [`Conn::request`], with its own timeout.
    Task(oneshot::Sender<Reply>),
    /// A callback from [`Conn::request_detached`] and when it times out.
    Call(ReplyFn, Instant),
}

impl Waiter {
    /// The answer, or why there is none, to whoever waits. A callback that panics loses only
    /// its own answer (its reply, dropped, answers EIO), never the connection's reader.
    fn complete(self, result: Result<Reply, SendError>) {
        match (self, result) {
            // The caller may have given up (dropped its future): nothing to do then.
            (Waiter::Task(tx), Ok(reply)) => drop(tx.send(reply)),
            // Dropping the sender wakes the task with the loss.
            (Waiter::Task(_), Err(_)) => {}
            (Waiter::Call(f, _), result) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(result))).is_err() {
                    tracing::error!("a detached request's callback panicked");
                }
            }
        }
    }
}

/// What the server told this client unasked, after [`Mux::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Another connection of the same user changed these paths (entries or contents); `all`:
    /// notices were lost on the server's side, so every cached entry may be stale.
    Changed { paths: Vec<WirePath>, all: bool },
    /// The connection was lost and made again: notices of the gap are lost, so every cached entry
    /// may be stale. Sent once the new connection is subscribed again.
    Reconnected,
}

/// Receives notices. Called from the connection's reader task: it must return at once (queue the
/// work elsewhere; in particular never call into the kernel's FUSE notify from it, which can wait
/// on a request that this very reader must answer).
pub type NoticeFn = Arc<dyn Fn(Notice) + Send + Sync>;

/// Where notices go; shared by the mux and every connection it makes.
#[derive(Default)]
struct NoticeSink {
    to: Mutex<Option<NoticeFn>>,
}

impl NoticeSink {
    fn deliver(&self, n: Notice) {
        let to = lock(&self.to).clone();
        if let Some(f) = to {
            f(n);
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The connection was dead before the request was queued: it never reached the server.
    NotSent,
    /// The connection died after the request was queued: the server may have applied it.
    Lost,
    /// No answer within [`REPLY_TIMEOUT`].
    TimedOut,
}

/// One live TLS connection.
pub(crate) struct Conn {
    /// Counts connections of this client: a server `Fh` is valid only on its own epoch.
    pub epoch: u64,
    next_id: AtomicU64,
    tx: mpsc::Sender<(RequestHeader, Bytes)>,
    /// The write half: the writer task holds it while it empties the queue; a request finding it
    /// free (and the queue empty) writes its own frame.
    writer: tokio::sync::Mutex<Writer>,
    /// Requests queued or sent and not yet answered; `None` once the connection is dead, so no
    /// request can be added after the waiters were woken.
    pending: Mutex<Option<HashMap<RequestId, Waiter>>>,
    /// When the last frame arrived, for the keepalive.
    last_frame: Mutex<Instant>,
    /// Cancelled when the connection dies (or the client is dropped: a child token).
    dead: CancellationToken,
    /// Where unasked `Changed` frames go.
    notices: Arc<NoticeSink>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data (single inserts and
    // removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    /// Starts the reader and writer tasks on a logged-in transport.
    fn spawn(t: Transport, epoch: u64, parent: &CancellationToken, notices: Arc<NoticeSink>) -> Arc<Conn> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let conn = Arc::new(Conn {
            epoch,
            next_id: AtomicU64::new(1),
            tx,
            writer: tokio::sync::Mutex::new(t.writer),
            pending: Mutex::new(Some(HashMap::new())),
            last_frame: Mutex::new(Instant::now()),
            dead: parent.child_token(),
            notices,
        });
        tokio::spawn(read_loop(conn.clone(), t.reader));
        tokio::spawn(write_loop(conn.clone(), rx));
        conn
    }

    /// Whether the connection is known to be dead.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }

    /// Declares the connection dead and wakes every waiter (their oneshots are dropped).
    pub(crate) fn kill(&self) {
        self.dead.cancel();
        let waiters = lock(&self.pending).take();
        for (_, w) in waiters.into_iter().flatten() {
            w.complete(Err(SendError::Lost));
        }
    }

    /// Sends one request and waits for its answer.
    pub(crate) async fn request(&self, request: Request, data: Bytes) -> Result<Reply, SendError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        match lock(&self.pending).as_mut() {
            Some(map) => map.insert(id, Waiter::Task(tx)),
            None => return Err(SendError::NotSent),
        };
        let header = RequestHeader { id, request };
        // The fast path: nothing queued and the writer idle, so this frame would be written next
        // anyway; writing it here saves waking the writer task.
        let direct = if self.tx.capacity() == WRITE_QUEUE { self.writer.try_lock().ok() } else { None };
        match direct {
            Some(mut writer) => {
                if self.is_dead() {
                    // Killed after the insert above (the pending map is gone): the frame must
                    // not go out on a connection that callers already count as lost.
                    return Err(SendError::NotSent);
                }
                if let Err(e) = self.write_now(&mut writer, &header, &data).await {
                    tracing::warn!(epoch = self.epoch, error = %e, "write failed; dropping the connection");
                    self.kill();
                }
            }
            None => {
                if self.tx.send((header, data)).await.is_err() {
                    self.forget(id);
                    return Err(SendError::NotSent);
                }
            }
        }
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(SendError::Lost),
            Err(_) => {
                self.forget(id);
                Err(SendError::TimedOut)
            }
        }
    }

    /// Sends one request without waiting for its answer: `done` is called with it exactly once,
    /// by the reader task when it arrives (or as the module doc says). Returns once the frame is
    /// written (the writer idle: by this caller, without a hop) or queued; never waits for room in
    /// the queue (a full queue is `NotSent`).
    pub(crate) async fn request_detached(&self, request: Request, data: Bytes, done: ReplyFn) {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let waiter = Waiter::Call(done, Instant::now() + REPLY_TIMEOUT);
        let refused = match lock(&self.pending).as_mut() {
            Some(map) => {
                map.insert(id, waiter);
                None
            }
            None => Some(waiter),
        };
        if let Some(w) = refused {
            return w.complete(Err(SendError::NotSent));
        }
        let header = RequestHeader { id, request };
        let direct = if self.tx.capacity() == WRITE_QUEUE { self.writer.try_lock().ok() } else { None };
        match direct {
            Some(mut writer) => {
                if self.is_dead() {
                    // Killed after the insert above: `kill` has called (or will call) `done`.
                    return;
                }
                if let Err(e) = self.write_now(&mut writer, &header, &data).await {
                    tracing::warn!(epoch = self.epoch, error = %e, "write failed; dropping the connection");
                    self.kill();
                }
            }
            None => {
                if self.tx.try_send((header, data)).is_err() {
                    if let Some(w) = self.take(id) {
                        w.complete(Err(SendError::NotSent));
                    }
                }
            }
        }
    }

    /// The waiter for `id`, if it still waits (`None` once answered or woken by `kill`).
    fn take(&self, id: RequestId) -> Option<Waiter> {
        lock(&self.pending).as_mut().and_then(|m| m.remove(&id))
    }

    /// Fails the detached requests past their deadline with `TimedOut`.
    fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<Waiter> = match lock(&self.pending).as_mut() {
            Some(map) => {
                let ids: Vec<RequestId> = map
                    .iter()
                    .filter(|(_, w)| matches!(w, Waiter::Call(_, deadline) if *deadline <= now))
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| map.remove(id)).collect()
            }
            None => Vec::new(),
        };
        for w in expired {
            w.complete(Err(SendError::TimedOut));
        }
    }

    /// Writes and flushes one frame from the caller's task. A caller dropped in the middle (its
    /// future cancelled) would leave half a frame on the stream: the guard kills the connection
    /// then, so that no later frame is read as the rest of it.
    async fn write_now(&self, writer: &mut Writer, header: &RequestHeader, data: &[u8]) -> std::io::Result<()> {
        struct KillUnlessDone<'a>(&'a Conn, bool);
        impl Drop for KillUnlessDone<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.kill();
                }
            }
        }
        let mut guard = KillUnlessDone(self, false);
        let result = async {
            with_timeout("write", WRITE_TIMEOUT, async {
                write_frame(&mut *writer, header, data, MAX_FRAME_BYTES).await.map_err(frame_io)
            })
            .await?;
            with_timeout("flush", WRITE_TIMEOUT, writer.flush()).await
        }
        .await;
        guard.1 = true;
        result
    }

    fn forget(&self, id: RequestId) {
        drop(self.take(id));
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_frame).elapsed()
    }
}

/// Completes the oneshots with the answers as they arrive, in any order.
async fn read_loop(conn: Arc<Conn>, mut reader: Reader) {
    let mut sweep = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            _ = conn.dead.cancelled() => break,
            next = reader.next() => next,
            _ = sweep.tick() => {
                conn.sweep();
                continue;
            }
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::warn!(epoch = conn.epoch, error = %e, "connection failed");
                break;
            }
            None => {
                tracing::debug!(epoch = conn.epoch, "server closed the connection");
                break;
            }
        };
        *lock(&conn.last_frame) = Instant::now();
        let header = match frame.response() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(epoch = conn.epoch, error = %e, "undecodable answer; dropping the connection");
                break;
            }
        };
        if header.id == NOTICE_ID {
            match header.result {
                Ok(Response::Changed { paths, all }) => conn.notices.deliver(Notice::Changed { paths, all }),
                other => tracing::debug!(?other, "unexpected unasked frame; ignored"),
            }
            continue;
        }
        match conn.take(header.id) {
            Some(w) => w.complete(Ok((header.result, frame.data))),
            None => tracing::debug!(id = header.id.0, "answer to a request no one waits for"),
        }
    }
    conn.kill();
}

/// Writes queued frames, flushing only when the queue is empty so that bursts share TLS records.
async fn write_loop(conn: Arc<Conn>, mut rx: mpsc::Receiver<(RequestHeader, Bytes)>) {
    let result: std::io::Result<()> = async {
        loop {
            let first = tokio::select! {
                _ = conn.dead.cancelled() => return Ok(()),
                m = rx.recv() => m,
            };
            let Some(mut next) = first else { return Ok(()) };
            // A request writing its own frame holds the writer for one frame and a flush.
            let mut writer = tokio::select! {
                _ = conn.dead.cancelled() => return Ok(()),
                w = conn.writer.lock() => w,
            };
            loop {
                let (header, data) = next;
                // A per-write timeout bounds how long a stuck peer can hold us; one around the
                // loop would bound the connection's whole life instead.
                with_timeout("write", WRITE_TIMEOUT, async {
                    write_frame(&mut *writer, &header, &data, MAX_FRAME_BYTES).await.map_err(frame_io)
                })
                .await?;
                match rx.try_recv() {
                    Ok(m) => next = m,
                    Err(_) => break,
                }
            }
            with_timeout("flush", WRITE_TIMEOUT, writer.flush()).await?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(epoch = conn.epoch, error = %e, "write failed; dropping the connection");
    }
    conn.kill();
}

/// The current connection, as callers see it.
#[derive(Clone)]
pub(crate) enum State {
    Up(Arc<Conn>),
    /// Lost; the supervisor is reconnecting.
    Down,
    /// Cannot come back (the token was refused, or the client was dropped): the reason.
    Failed(String),
}

/// The connection that survives losses.
pub(crate) struct Mux {
    dialer: Dialer,
    /// The latest session token; every successful `Resume` replaces it.
    token: Mutex<Token>,
    state: watch::Sender<State>,
    /// Cancelled when the client is dropped: ends the supervisor and the connection's tasks.
    shutdown: CancellationToken,
    /// The keepalive idle time in milliseconds, and a wake-up for the supervisor when it changes.
    keepalive_ms: AtomicU64,
    keepalive_changed: tokio::sync::Notify,
    /// Successful reconnects so far.
    reconnects: AtomicU64,
    /// Where notices go, and whether to subscribe again on every new connection.
    notices: Arc<NoticeSink>,
    subscribed: AtomicBool,
}

impl Mux {
    /// Starts multiplexing on the first, logged-in connection.
    pub(crate) fn start(dialer: Dialer, transport: Transport, token: Token) -> Arc<Mux> {
        let shutdown = CancellationToken::new();
        let notices = Arc::new(NoticeSink::default());
        let conn = Conn::spawn(transport, 0, &shutdown, notices.clone());
        let (state, _) = watch::channel(State::Up(conn.clone()));
        let mux = Arc::new(Mux {
            dialer,
            token: Mutex::new(token),
            state,
            shutdown,
            keepalive_ms: AtomicU64::new(KEEPALIVE_IDLE.as_millis() as u64),
            keepalive_changed: tokio::sync::Notify::new(),
            reconnects: AtomicU64::new(0),
            notices,
            subscribed: AtomicBool::new(false),
        });
        tokio::spawn(supervise(mux.clone(), conn));
        mux
    }

    /// Ends the supervisor and the connection (the client is gone).
    pub(crate) fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// The current connection, waiting for a reconnect until `deadline`.
    ///
    /// # Errors
    /// `Io` when the deadline passes first; `NotConnected` when the connection cannot come back.
    pub(crate) async fn conn(&self, deadline: Instant, waited: Duration) -> Result<Arc<Conn>, WireError> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                State::Up(c) if !c.is_dead() => return Ok(c.clone()),
                State::Failed(why) => return Err(WireError::new(ErrorCode::NotConnected, why.clone())),
                _ => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(WireError::new(ErrorCode::NotConnected, "client closed")),
                Err(_) => {
                    return Err(WireError::new(
                        ErrorCode::Io,
                        format!("server unreachable; gave up after waiting {}s for the connection", waited.as_secs()),
                    ))
                }
            }
        }
    }

    /// The current connection if it is up, without waiting.
    pub(crate) fn current(&self) -> Option<Arc<Conn>> {
        match &*self.state.borrow() {
            State::Up(c) if !c.is_dead() => Some(c.clone()),
            _ => None,
        }
    }

    /// How many times the connection was made again after a loss.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Kills the current connection as a network failure would (the supervisor reconnects).
    pub(crate) fn break_connection(&self) {
        if let State::Up(c) = &*self.state.borrow() {
            c.kill();
        }
    }

    /// Sends `Subscribe` on the current connection and on every later one; `to` gets the notices.
    ///
    /// # Errors
    /// The server's refusal, or `Io`/`NotConnected` when no connection comes up within `wait`.
    pub(crate) async fn subscribe(&self, to: NoticeFn, wait: Duration) -> Result<(), WireError> {
        *lock(&self.notices.to) = Some(to);
        self.subscribed.store(true, Ordering::SeqCst);
        let conn = self.conn(Instant::now() + wait, wait).await?;
        match subscribe_on(&conn).await {
            Ok(()) => Ok(()),
            // Refused: never ask again (a reconnect would only be refused again).
            Err(Ok(refused)) => {
                self.subscribed.store(false, Ordering::SeqCst);
                *lock(&self.notices.to) = None;
                Err(refused)
            }
            // The connection failed; the supervisor subscribes again on the next one.
            Err(Err(e)) => Err(WireError::new(ErrorCode::Io, format!("subscribe: connection {e:?}"))),
        }
    }

    /// Sets how long the connection may be idle before a keepalive `Ping` (at least 100 ms).
    pub(crate) fn set_keepalive(&self, idle: Duration) {
        self.keepalive_ms.store(idle.as_millis().max(100) as u64, Ordering::Relaxed);
        self.keepalive_changed.notify_one();
    }

    /// Probes an idle connection; returns once it is dead or the client is gone.
    async fn keepalive(&self, conn: &Conn) {
        loop {
            let every = Duration::from_millis(self.keepalive_ms.load(Ordering::Relaxed));
            let idle = conn.idle_for();
            if idle < every {
                tokio::select! {
                    _ = conn.dead.cancelled() => return,
                    _ = self.keepalive_changed.notified() => continue,
                    _ = tokio::time::sleep(every - idle) => continue,
                }
            }
            let ping = tokio::time::timeout(KEEPALIVE_TIMEOUT, conn.request(Request::Ping, Bytes::new()));
            let answered = tokio::select! {
                _ = conn.dead.cancelled() => return,
                r = ping => matches!(r, Ok(Ok(_))),
            };
            if !answered {
                tracing::warn!(epoch = conn.epoch, "keepalive unanswered; dropping the connection");
                conn.kill();
                return;
            }
            // An answered ping moved `last_frame`, so the next round sleeps again.
        }
    }
}

/// Sends `Subscribe` on `conn` and waits (bounded by the reply timeout) for its answer.
/// `Err(Ok(e))`: the server refused (it does not know `Subscribe`); `Err(Err(_))`: the connection
/// failed first.
async fn subscribe_on(conn: &Conn) -> Result<(), Result<WireError, SendError>> {
    match conn.request(Request::Subscribe, Bytes::new()).await {
        Ok((Ok(_), _)) => Ok(()),
        Ok((Err(e), _)) => Err(Ok(e)),
        Err(e) => Err(Err(e)),
    }
}

/// Watches the connection; after a loss, reconnects with backoff and `Resume`s with the token.
async fn supervise(mux: Arc<Mux>, mut conn: Arc<Conn>) {
    loop {
        mux.keepalive(&conn).await;
        if mux.shutdown.is_cancelled() {
            mux.state.send_replace(State::Failed("client closed".into()));
            return;
        }
        mux.state.send_replace(State::Down);
        tracing::warn!(server = %mux.dialer.host_port(), "connection lost; reconnecting");
        let mut delay = BACKOFF_FIRST;
        loop {
            let token = lock(&mux.token).clone();
            let attempt = tokio::select! {
                _ = mux.shutdown.cancelled() => return,
                r = mux.dialer.resume(token) => r,
            };
            match attempt {
                Ok((transport, fresh)) => {
                    *lock(&mux.token) = fresh;
                    conn = Conn::spawn(transport, conn.epoch + 1, &mux.shutdown, mux.notices.clone());
                    if mux.subscribed.load(Ordering::SeqCst) {
                        match subscribe_on(&conn).await {
                            Ok(()) => {}
                            Err(Ok(refused)) => {
                                // A server without notices (replaced by an older one): stop asking;
                                // the cache falls back to its TTL after dropping everything below.
                                tracing::warn!(error = %refused, "the server no longer sends change notices");
                                mux.subscribed.store(false, Ordering::SeqCst);
                            }
                            Err(Err(e)) => {
                                tracing::warn!(error = ?e, "subscribing to change notices failed; reconnecting");
                                conn.kill();
                                tokio::select! {
                                    _ = mux.shutdown.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                delay = (delay * 2).min(BACKOFF_MAX);
                                continue;
                            }
                        }
                        mux.notices.deliver(Notice::Reconnected);
                    }
                    mux.reconnects.fetch_add(1, Ordering::Relaxed);
                    mux.state.send_replace(State::Up(conn.clone()));
                    tracing::info!(server = %mux.dialer.host_port(), epoch = conn.epoch, "reconnected");
                    break;
                }
                Err(ConnectError::Denied) => {
                    let why = "the server refused the session token (401); log in again";
                    tracing::error!(server = %mux.dialer.host_port(), "{why}");
                    mux.state.send_replace(State::Failed(why.into()));
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?delay, "reconnect failed");
                    tokio::select! {
                        _ = mux.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}
