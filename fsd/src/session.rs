//! One connection, from TLS handshake to close: the version check, login, then every request
//! handled concurrently, with a writer task that owns the write half.
//!
//! ```text
//! reader (this task) --spawn--> one task per request --(bounded channel)--> writer task --> TLS
//!                                 notice task (after Subscribe) --^  (id 0, one frame queued at most;
//!                                   a lock grant queues what is pending first: `notice_sender.rs`)
//!                    --spawn_blocking--> a Read: pread, then the answer written to TLS directly
//!                                        when the writer is idle, else queued (`ReadNow`)
//!                    (itself) a small Read alone in flight that misses the page cache: pread and
//!                             answer on the reader (`read_in_place`)
//! ```
//! `Subscribe` and requests with the reserved id 0 are the session layer's: the first starts the
//! connection's notice task (PROTOCOL.md, "Change notices"), the second is refused (`Protocol`).
//!
//! Cheap requests skip the task and the blocking pool when they cannot wait for the disk: a
//! `Stat` whose whole lookup is in the kernel's dcache (`RESOLVE_CACHED`) and a `Read` of at most
//! 64 KiB whose bytes are in the page cache (`RWF_NOWAIT`) are answered by the reader itself;
//! anything else (or on any error) goes the usual way. For a 4 KiB read or a stat that was three
//! to four context switches of fsd per request, now one (`round_trip_rate` in
//! tests/session_protocol.rs measures it). A Read that must wait for the disk goes to one
//! blocking-pool thread that also writes its answer ([`ReadNow`]): a cold 4 KiB read costs fsd
//! about 3 context switches instead of 6; when it is the session's only request in flight (a
//! random read at queue depth 1), the reader itself waits for the disk and answers
//! ([`read_in_place`]): about 2 (fio 4 KiB randread QD1, `perf stat -e context-switches`: 3.4-3.9
//! -> 2.8-2.9 a read, fsd CPU 43-49 -> 37-38 us a read).
//! Back-pressure: a request takes a session permit before it is read; its task keeps the permit
//! until its answer is queued. A client that stops reading fills the writer's queue, the tasks
//! wait with their permits, and the reader stops reading that client: nothing grows without
//! bound, and TCP pushes back on that client alone. Data is bounded in bytes too, server-wide:
//! a request's data takes its share of `max_buffered_writes` before the next frame is read, and
//! a Read takes its share of `max_buffered_reads` before its data is read from disk.

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use homefs_shared::frame::{write_frame, FrameCodec};
use homefs_shared::{
    login_code, ErrorCode, Fh, Frame, FrameError, LockKind, Request, RequestId, Response, ResponseHeader, WireError,
    NOTICE_ID, PROTOCOL_VERSION,
};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::accounts::Login;
use crate::notice_sender::NoticeSender;
use crate::ops::file::CACHED_READ_MAX;
use crate::ops::AuthedSession;
use crate::shutdown::Shutdown;
use crate::State;

/// Answers queued for the writer. Small on purpose: each answer may carry up to 4 MiB of data,
/// and a session's memory is bounded by (max_in_flight_per_session + this) answers. 16 keeps the
/// writer busy between wake-ups (it flushes only when the queue is empty) without letting a
/// client that stops reading pin much more than its in-flight requests already do.
pub const WRITER_QUEUE: usize = 16;

/// The writer's buffer: many small answers go out in one TLS record batch; large data passes
/// through without being copied into it.
pub const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// How long a session's end waits, after cancelling its requests at the deadline, for blocking
/// reads that cannot be cancelled.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// An answer, the data that follows it in its frame, and what it holds until it is written: the
/// share of the server's read budget its data holds, or a notice frame's queue slot.
pub(crate) type Answer = (ResponseHeader, Bytes, Option<OwnedSemaphorePermit>);

/// Why a session ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed the connection.
    Closed,
    /// No frame within the idle timeout (or no login within the login timeout).
    Idle,
    /// A frame that can never be valid, or an I/O error reading.
    BadFrame,
    /// Hello with another version, or no Hello first.
    Version,
    /// The writer failed (the client stopped reading, or the connection broke).
    WriterGone,
    /// The server is shutting down.
    Shutdown,
    /// Refused after authentication (connection limit, home unavailable).
    Refused,
    /// The user was deleted from the users file while logged in.
    Revoked,
}

/// Serves one accepted TCP connection until it ends. Holds `_conn_permit` (the server's
/// connection limit) for the connection's whole life.
pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    mut shutdown: Shutdown,
    id: u64,
    _conn_permit: OwnedSemaphorePermit,
) {
    let limits = &state.config.limits;
    let _ = tcp.set_nodelay(true);
    let tls = match with_timeout(state.tls.accept(tcp), "TLS handshake", limits.handshake_timeout_secs).await {
        Ok(tls) => tls,
        Err(e) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
    };
    let (read_half, write_half) = tokio::io::split(tls);
    let mut frames = FramedRead::new(read_half, FrameCodec::new(limits.max_frame_bytes));
    let (tx, rx) = mpsc::channel::<Answer>(WRITER_QUEUE);
    let out = Arc::new(AnswerOut::new(Box::new(write_half), limits.max_frame_bytes, limits.write_timeout_secs));
    let writer = tokio::spawn(write_answers(out.clone(), rx).in_current_span());

    let mut requests = 0u64;
    let end = match greet_and_login(&mut frames, &tx, &state, peer, id, &mut shutdown).await {
        Err(end) => end,
        Ok((authed, _user_permit)) => {
            let mut tasks = JoinSet::new();
            let mut notices = None;
            let mut session =
                Serving { tasks: &mut tasks, notices: &mut notices, requests: &mut requests, out: out.clone() };
            let end = serve_requests(&mut frames, &tx, &state, &authed, &mut session, &mut shutdown).await;
            drop(frames);
            // Unsubscribes (the task owns the subscription) and lets go of its writer sender.
            if let Some((task, sender)) = notices.take() {
                task.abort();
                let _ = task.await;
                drop(sender);
            }
            // In-flight requests finish (by the server's shutdown deadline, or within the
            // shutdown timeout when the client went), then the session's locks and files go.
            let finish_by = shutdown.deadline().unwrap_or_else(|| Instant::now() + limits.shutdown_timeout_secs);
            if tokio::time::timeout_at(finish_by, drain(&mut tasks)).await.is_err() {
                warn!(left = tasks.len(), "in-flight requests still running at the deadline; cancelling them");
                tasks.abort_all();
                // Aborted tasks end at once; a read on a blocking thread (`ReadNow`) cannot be
                // aborted and may be stuck in the disk: it is left to finish on its own (it holds
                // its handle, and its answer goes nowhere once the writer is gone).
                if tokio::time::timeout(ABORT_GRACE, drain(&mut tasks)).await.is_err() {
                    warn!(left = tasks.len(), "blocking reads still running; not waiting for them");
                    tasks.detach_all();
                }
            }
            authed.end().await;
            end
        }
    };
    // The writer sends what is queued, flushes and closes once every sender is gone.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writer ended"),
        Err(e) => error!(error = %e, "writer task failed"),
    }
    info!(reason = ?end, requests, "session end");
}

async fn drain(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

type Frames<R> = FramedRead<R, FrameCodec>;

/// The next frame, or why there is none. Once shutdown has begun, only a frame that has already
/// arrived (whole, or its first bytes) is still read; then [`End::Shutdown`].
async fn next_frame<R: AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    deadline: Instant,
    shutdown: &mut Shutdown,
) -> Result<Frame, End> {
    if !shutdown.is_shutdown() {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, frames.next()) => return read_outcome(r.map_err(|_| End::Idle)),
            _ = shutdown.recv() => {}
        }
    }
    arrived_frame(frames, shutdown).await
}

/// During shutdown: the frame already received, if any. A client whose write was half sent when
/// SIGTERM came gets it finished and answered (the rest may take until the shutdown deadline);
/// a client that had sent nothing is not waited for.
async fn arrived_frame<R: AsyncRead + Unpin>(frames: &mut Frames<R>, shutdown: &Shutdown) -> Result<Frame, End> {
    let finish_by = shutdown.deadline().unwrap_or_else(Instant::now);
    // A client that keeps a stream of requests coming cannot hold the shutdown open.
    if Instant::now() >= finish_by {
        return Err(End::Shutdown);
    }
    if let Some(r) = frames.next().now_or_never() {
        return read_outcome(Ok(r));
    }
    if frames.read_buffer().is_empty() {
        return Err(End::Shutdown);
    }
    debug!(have = frames.read_buffer().len(), "shutting down: finishing a frame that has begun to arrive");
    read_outcome(tokio::time::timeout_at(finish_by, frames.next()).await.map_err(|_| End::Shutdown))
}

/// A read's outcome as a frame or why the session ends (`Err` is the end for a timeout).
fn read_outcome(r: Result<Option<Result<Frame, FrameError>>, End>) -> Result<Frame, End> {
    match r? {
        None => Err(End::Closed),
        Some(Ok(frame)) => Ok(frame),
        Some(Err(FrameError::Io(e))) => {
            debug!(error = %e, "read failed");
            Err(End::Closed)
        }
        Some(Err(e)) => {
            warn!(error = %e, "bad frame; closing the connection");
            Err(End::BadFrame)
        }
    }
}

async fn answer(tx: &mpsc::Sender<Answer>, id: RequestId, result: Result<Response, WireError>) -> Result<(), End> {
    tx.send((ResponseHeader { id, result }, Bytes::new(), None)).await.map_err(|_| End::WriterGone)
}

/// Hello, then Login or Resume until one succeeds, all before the login deadline.
async fn greet_and_login<R: AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    tx: &mpsc::Sender<Answer>,
    state: &State,
    peer: SocketAddr,
    conn_id: u64,
    shutdown: &mut Shutdown,
) -> Result<(Arc<AuthedSession>, OwnedSemaphorePermit), End> {
    let deadline = Instant::now() + state.config.limits.login_timeout_secs;
    let frame = next_frame(frames, deadline, shutdown).await?;
    let header = decode(&frame)?;
    match header.request {
        Request::Hello { version, client } if version == PROTOCOL_VERSION => {
            debug!(client, "hello");
            let server = format!("fsd {}", env!("CARGO_PKG_VERSION"));
            answer(tx, header.id, Ok(Response::Hello { version: PROTOCOL_VERSION, server })).await?;
        }
        Request::Hello { version, client } => {
            warn!(client, version, "protocol version mismatch");
            let msg = format!("client speaks protocol {version}, server speaks {PROTOCOL_VERSION}");
            answer(tx, header.id, Err(WireError::new(ErrorCode::Protocol, msg))).await?;
            return Err(End::Version);
        }
        _ => {
            warn!("first request is not Hello");
            let msg = format!("the first request must be Hello (server speaks protocol {PROTOCOL_VERSION})");
            answer(tx, header.id, Err(WireError::new(ErrorCode::Protocol, msg))).await?;
            return Err(End::Version);
        }
    }
    loop {
        let frame = next_frame(frames, deadline, shutdown).await?;
        let header = decode(&frame)?;
        let login = match header.request {
            Request::Login { user, password } => state.accounts.login_password(&user, password, peer.ip()).await,
            Request::Resume { token } => state.accounts.login_token(&token, peer.ip()).await,
            _ => {
                warn!(request = request_kind(&header.request), "request before login");
                answer(tx, header.id, Err(WireError::new(ErrorCode::Access, "log in first"))).await?;
                continue;
            }
        };
        let Login::Granted { user, quota, token } = login else {
            let denied = Response::Login { code: login_code::DENIED, token: None, message: "login incorrect".into() };
            answer(tx, header.id, Ok(denied)).await?;
            continue;
        };
        let Some(user_permit) = state.try_user_permit(&user) else {
            warn!(user, limit = state.config.limits.max_connections_per_user, "too many connections of this user");
            let msg = "too many connections for this user";
            answer(tx, header.id, Err(WireError::new(ErrorCode::Busy, msg))).await?;
            return Err(End::Refused);
        };
        let home = match state.homes.open(&user, quota).await {
            Ok(home) => home,
            Err(e) => {
                error!(user, error = %e, "cannot open the user's home");
                answer(tx, header.id, Err(WireError::new(ErrorCode::from(&e), "cannot open the home"))).await?;
                return Err(End::Refused);
            }
        };
        tracing::Span::current().record("user", user.as_str());
        let authed = Arc::new(AuthedSession::new(home, state.locks.clone(), conn_id));
        let ok = Response::Login { code: login_code::LOGGED_IN, token: Some(token), message: "logged in".into() };
        answer(tx, header.id, Ok(ok)).await?;
        return Ok((authed, user_permit));
    }
}

fn decode(frame: &Frame) -> Result<homefs_shared::RequestHeader, End> {
    frame.request().map_err(|e| {
        warn!(error = %e, "undecodable request; closing the connection");
        End::BadFrame
    })
}

/// What a logged-in session's reader keeps besides the connection.
struct Serving<'a> {
    /// One task per request in flight.
    tasks: &'a mut JoinSet<()>,
    /// The change-notice task and its sender, once the client subscribed.
    notices: &'a mut Option<(JoinHandle<()>, Arc<NoticeSender>)>,
    /// Requests read, for the log.
    requests: &'a mut u64,
    /// The write half, for answers written by the thread that made them.
    out: Arc<AnswerOut>,
}

/// After login: reads requests and hands each to its own task, until the connection ends.
async fn serve_requests<R: AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    tx: &mpsc::Sender<Answer>,
    state: &State,
    authed: &Arc<AuthedSession>,
    serving: &mut Serving<'_>,
    shutdown: &mut Shutdown,
) -> End {
    let Serving { tasks, notices, requests, out } = serving;
    let limits = &state.config.limits;
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_session));
    // When reads in place are off after a slow one (`read_in_place`).
    let mut in_place = InPlace::default();
    loop {
        while tasks.try_join_next().is_some() {}
        // Taken before reading: while every permit is busy this client is not read. A free
        // permit goes first, so that during shutdown what has arrived is still read.
        let permit = tokio::select! {
            biased;
            p = in_flight.clone().acquire_owned() => p.expect("the session semaphore is never closed"),
            _ = shutdown.recv() => return End::Shutdown,
            _ = tx.closed() => return End::WriterGone,
        };
        // A timeout per read caps idle time; one around the loop would cap the session's life.
        let deadline = Instant::now() + limits.idle_timeout_secs;
        let frame = tokio::select! {
            r = next_frame(frames, deadline, shutdown) => match r {
                Ok(frame) => frame,
                Err(end) => return end,
            },
            _ = tx.closed() => return End::WriterGone,
        };
        let header = match decode(&frame) {
            Ok(h) => h,
            Err(end) => return end,
        };
        **requests += 1;
        let id = header.id;
        // Deleting a user ends their sessions too, not only their tokens: checked per request
        // (one map lookup), so an idle session ends at its next request or its idle timeout.
        if !state.accounts.exists(authed.user()) {
            warn!(user = authed.user(), "user deleted; ending the session");
            let _ = answer(tx, id, Err(WireError::new(ErrorCode::Access, "user deleted"))).await;
            return End::Revoked;
        }
        if id == NOTICE_ID {
            // Its answer would look like a notice: refused (the client numbers from 1).
            warn!("request with the notice id 0");
            if answer(tx, id, Err(WireError::new(ErrorCode::Protocol, "request id 0 is reserved"))).await.is_err() {
                return End::WriterGone;
            }
            continue;
        }
        if matches!(header.request, Request::Subscribe) {
            // Done first, so that every notice comes after it; a second Subscribe changes nothing.
            if answer(tx, id, Ok(Response::Done)).await.is_err() {
                return End::WriterGone;
            }
            if notices.is_none() {
                let subscription = authed.home().notices.subscribe(authed.id());
                debug!(watchers = authed.home().notices.watchers(), "subscribed to change notices");
                let sender = NoticeSender::new(subscription, tx.clone());
                let task = tokio::spawn(sender.clone().run().in_current_span());
                **notices = Some((task, sender));
            }
            continue;
        }
        if matches!(header.request, Request::Hello { .. } | Request::Login { .. } | Request::Resume { .. }) {
            warn!(request = request_kind(&header.request), "handshake request after login");
            let err = WireError::new(ErrorCode::Protocol, "already logged in");
            if answer(tx, id, Err(err)).await.is_err() {
                return End::WriterGone;
            }
            continue;
        }
        debug!(id = id.0, request = ?header.request, "request");
        // The request's data takes its share of the server's write budget before the next frame
        // is read: a connection holds at most that share and the one frame being read, and all
        // of them together at most `max_buffered_writes` plus one frame each. The share is held
        // until the handler has consumed the data.
        let write_held = match data_budget_units(frame.data.len()) {
            None => None,
            Some(units) => {
                let budget_wait = limits.write_timeout_secs * 2;
                let acquired = tokio::select! {
                    r = tokio::time::timeout(budget_wait, state.write_budget.clone().acquire_many_owned(units)) => r,
                    _ = tx.closed() => return End::WriterGone,
                };
                match acquired {
                    Ok(Ok(held)) => Some(held),
                    _ => {
                        warn!(id = id.0, "write budget exhausted; request refused");
                        let err = WireError::new(ErrorCode::Busy, "server busy: too much request data unhandled");
                        if answer(tx, id, Err(err)).await.is_err() {
                            return End::WriterGone;
                        }
                        continue;
                    }
                }
            }
        };
        // A small Read whose bytes are in the page cache is answered here, without a task and
        // without a hop to the blocking pool (for a 4 KiB read those hops are most of the time);
        // one that would wait for the disk goes the usual way, so the reader never blocks on it.
        if let Request::Stat { path } = &header.request {
            if let Some(response) = authed.stat_cached(path) {
                if answer(tx, id, Ok(response)).await.is_err() {
                    return End::WriterGone;
                }
                drop(permit);
                continue;
            }
        }
        if let Request::Read { fh, offset, len } = header.request {
            if let Some(answered) = read_cached(state, authed, fh, offset, len) {
                let (response, data, held) = answered;
                let header = ResponseHeader { id, result: Ok(response) };
                if tx.send((header, data, held)).await.is_err() {
                    return End::WriterGone;
                }
                drop(permit);
                continue;
            }
        }
        // Any other Read whose share of the read budget is free at once: one blocking thread
        // reads, then writes (or queues) the answer itself (`ReadNow`).
        if let Request::Read { fh, offset, len } = header.request {
            let units = data_budget_units(len.min(homefs_shared::MAX_DATA_BYTES) as usize);
            let held = match units {
                None => Ok(None),
                Some(units) => state.read_budget.clone().try_acquire_many_owned(units).map(Some),
            };
            if let Ok(held) = held {
                let read = ReadNow { id, fh, offset, len, held, permit };
                // Alone in flight (queue depth 1): read here, see `read_in_place`.
                let alone = in_flight.available_permits() + 1 == limits.max_in_flight_per_session;
                let read = if alone { read_in_place(read, authed, out, tx, &mut in_place).await } else { Err(read) };
                match read {
                    Ok(Ok(())) => {}
                    Ok(Err(end)) => return end,
                    Err(read) => {
                        let (tx, authed, out) = (tx.downgrade(), authed.clone(), out.clone());
                        let span = tracing::Span::current();
                        tasks.spawn_blocking(move || span.in_scope(|| read.run(&authed, &out, &tx)));
                    }
                }
                continue;
            }
        }
        let (tx, authed) = (tx.clone(), authed.clone());
        // A granted lock is an acquire barrier for change notices (see `notice_sender.rs`).
        let barrier = match (&header.request, notices.as_ref()) {
            (Request::Lock { lock, .. }, Some((_, sender))) if lock.kind != LockKind::Unlock => Some(sender.clone()),
            _ => None,
        };
        let read_units = match header.request {
            Request::Read { len, .. } => data_budget_units(len.min(homefs_shared::MAX_DATA_BYTES) as usize),
            _ => None,
        };
        let (budget, budget_wait) = (state.read_budget.clone(), limits.write_timeout_secs * 2);
        tasks.spawn(
            async move {
                // A Read takes its share of the server's read budget before its data is read, so
                // clients that ask for more than they read cannot make the server hold more than
                // `max_buffered_reads` (one session alone is bounded by its in-flight limit).
                // Shares come back as writers send or time out, so the wait is bounded too.
                let held = match read_units {
                    None => None,
                    Some(units) => match tokio::time::timeout(budget_wait, budget.acquire_many_owned(units)).await {
                        Ok(Ok(held)) => Some(held),
                        _ => {
                            warn!(id = id.0, "read budget exhausted; read refused");
                            let err = WireError::new(ErrorCode::Busy, "server busy: too much read data unsent");
                            let _ = tx.send((ResponseHeader { id, result: Err(err) }, Bytes::new(), None)).await;
                            return;
                        }
                    },
                };
                let outcome = AssertUnwindSafe(authed.handle(header.request, frame.data)).catch_unwind().await;
                drop(write_held);
                if let (Some(sender), Ok(Ok(_))) = (&barrier, &outcome) {
                    sender.barrier().await;
                }
                let (result, data) = answer_of(id, outcome);
                // Fails only when the writer is gone; the reader notices that itself.
                let _ = tx.send((ResponseHeader { id, result }, data, held)).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// A handler's outcome as the answer's result and data; a panic is answered as an internal
/// error (and logged), never left without an answer.
fn answer_of(
    id: RequestId,
    outcome: std::thread::Result<Result<(Response, Bytes), WireError>>,
) -> (Result<Response, WireError>, Bytes) {
    match outcome {
        Ok(Ok((response, data))) => (Ok(response), data),
        Ok(Err(e)) => (Err(e), Bytes::new()),
        Err(_) => {
            error!(id = id.0, "request handler panicked");
            (Err(WireError::new(ErrorCode::Io, "internal server error")), Bytes::new())
        }
    }
}

/// A `Read` answered on a blocking-pool thread from start to finish: the thread reads (waiting
/// for the disk if it must) and writes the answer to the connection itself when the writer is
/// idle (else queues it for the writer). The usual path goes reader -> request task -> blocking
/// pool -> request task -> writer: with a multi-thread runtime, the wake-up from the blocking
/// thread also wakes a second worker (tokio keeps one searching), so a 4 KiB read that missed
/// the page cache cost fsd 5-6 context switches, more time than the disk took.
struct ReadNow {
    id: RequestId,
    fh: Fh,
    offset: u64,
    len: u32,
    /// The read's share of the server's read budget, given back once its data is written.
    held: Option<OwnedSemaphorePermit>,
    /// The session's in-flight permit, kept until the answer is queued.
    permit: OwnedSemaphorePermit,
}

impl ReadNow {
    /// Call on a blocking-pool thread (`blocking_send` and `block_on` panic on a runtime thread).
    /// The queue is held weakly while reading, so that a read stuck in the disk does not keep
    /// the writer (and the session's end) waiting; once the session has let go of the queue, the
    /// answer is dropped. The wait for room in the queue is bounded by the writer: it drains the
    /// queue or, when a write times out or fails, ends and drops it, which ends the wait.
    fn run(self, authed: &AuthedSession, out: &AnswerOut, tx: &mpsc::WeakSender<Answer>) {
        let ReadNow { id, fh, offset, len, held, permit } = self;
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| crate::ops::file::read_now(authed, fh, offset, len)));
        let (result, data) = answer_of(id, outcome);
        let Some(tx) = tx.upgrade() else { return };
        let answer = (ResponseHeader { id, result }, data, held);
        if let Some(answer) = out.write_now(&tx, answer) {
            // Fails only when the writer is gone; the reader notices that itself.
            let _ = tx.blocking_send(answer);
        }
        drop(permit);
    }
}

/// A read in place slower than this (a slow or stuck disk, or a starved CPU) turns
/// [`read_in_place`] off for the session for a while ([`InPlace`]).
const IN_PLACE_SLOW: Duration = Duration::from_millis(20);
/// How long reads in place stay off after the first slow one; each slow one in a row doubles
/// it, up to [`IN_PLACE_OFF_MAX`]; a fast one resets it.
const IN_PLACE_OFF_FIRST: Duration = Duration::from_secs(1);
const IN_PLACE_OFF_MAX: Duration = Duration::from_secs(64);

/// Whether a session's reader may read in place ([`read_in_place`]): off for a while after a slow
/// read, so that a stuck disk holds the reader (and with it the session's other requests and
/// pings) for at most one read per [`IN_PLACE_OFF_MAX`], while one slow read on a busy machine (a
/// preempted reader) costs only [`IN_PLACE_OFF_FIRST`] of reads through the blocking pool.
#[derive(Debug)]
struct InPlace {
    off_until: Option<Instant>,
    off_for: Duration,
}

impl Default for InPlace {
    fn default() -> InPlace {
        InPlace { off_until: None, off_for: IN_PLACE_OFF_FIRST }
    }
}

impl InPlace {
    fn allowed(&self) -> bool {
        self.off_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Records how long a read in place took.
    fn took(&mut self, took: Duration) {
        if took < IN_PLACE_SLOW {
            self.off_for = IN_PLACE_OFF_FIRST;
            return;
        }
        warn!(?took, off_for = ?self.off_for, "a small read was slow; this session's reads go to the blocking pool for a while");
        self.off_until = Some(Instant::now() + self.off_for);
        self.off_for = (self.off_for * 2).min(IN_PLACE_OFF_MAX);
    }
}

/// The lone small `Read` of a session whose bytes are not in the page cache (the `RWF_NOWAIT`
/// attempt has just started the disk read), read and answered by the session's reader itself,
/// on its runtime worker: the answer does not wait for a blocking-pool thread to wake up (at
/// queue depth 1 that hop lies between the disk's answer and the client's, and on a loaded
/// 2-core machine it is often longer than the disk's remaining time). The worker waits for the
/// disk meanwhile (tens of microseconds); the runtime's other workers take its other tasks. While
/// it reads, this session reads no new request: so only when nothing else is in flight (the
/// client is waiting for this answer), at most [`CACHED_READ_MAX`] bytes, within the server-wide
/// bound on work waiting on runtime threads (`ops/inline.rs`), and not for a while after one took
/// [`IN_PLACE_SLOW`] or more ([`InPlace`]: the blocking pool waits for a slow disk).
/// Gives the read back (`Err`) when it does not qualify.
async fn read_in_place(
    read: ReadNow,
    authed: &AuthedSession,
    out: &AnswerOut,
    tx: &mpsc::Sender<Answer>,
    in_place: &mut InPlace,
) -> Result<Result<(), End>, ReadNow> {
    if read.len > CACHED_READ_MAX || !in_place.allowed() {
        return Err(read);
    }
    // One of the server-wide slots for work that may wait on the runtime thread (`ops/inline.rs`):
    // at least one runtime thread is never held by a disk.
    let Some(slot) = crate::ops::inline::Slot::try_take() else { return Err(read) };
    let ReadNow { id, fh, offset, len, held, permit } = read;
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| crate::ops::file::read_now(authed, fh, offset, len)));
    drop(slot);
    in_place.took(started.elapsed());
    let (result, data) = answer_of(id, outcome);
    let answer = (ResponseHeader { id, result }, data, held);
    let sent = match out.write_direct(tx, answer).await {
        None => Ok(()),
        Some(answer) => tx.send(answer).await.map_err(|_| End::WriterGone),
    };
    drop(permit);
    Ok(sent)
}

/// A cached small read, answered at once with its share of the read budget (taken without
/// waiting); `None` when it must go through the request's task.
fn read_cached(
    state: &State,
    authed: &AuthedSession,
    fh: Fh,
    offset: u64,
    len: u32,
) -> Option<(Response, Bytes, Option<OwnedSemaphorePermit>)> {
    if len > CACHED_READ_MAX {
        return None;
    }
    let held = match data_budget_units(len as usize) {
        None => None,
        Some(units) => Some(state.read_budget.clone().try_acquire_many_owned(units).ok()?),
    };
    let (response, data) = authed.read_cached(fh, offset, len)?;
    Some((response, data, held))
}

/// A share of a data budget: `bytes` in [`crate::READ_BUDGET_UNIT`]s, rounded up; `None` for no
/// data.
fn data_budget_units(bytes: usize) -> Option<u32> {
    let units = (bytes as u64).div_ceil(crate::READ_BUDGET_UNIT);
    // At most MAX_FRAME_BYTES / unit (69) for a frame that was accepted: fits.
    (units > 0).then(|| u32::try_from(units).unwrap_or(u32::MAX))
}

/// The request's name for the log, without its fields (a Login's carry the password).
fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "Hello",
        Request::Login { .. } => "Login",
        Request::Resume { .. } => "Resume",
        _ => "file request",
    }
}

/// The session's write half, shared by the writer task and the blocking threads that write a
/// `Read`'s answer themselves ([`AnswerOut::write_now`]). The async `Mutex` makes one frame at a
/// time go out whole; the writer task holds it while it empties its queue.
struct AnswerOut {
    /// `None` once a write failed or timed out: the stream may end in half a frame, so nothing
    /// may follow it.
    out: tokio::sync::Mutex<Option<BufWriter<BoxedWrite>>>,
    /// Cancelled when a direct write failed, so that the writer task ends (and with it, through
    /// its dropped queue, the session).
    broken: CancellationToken,
    max_frame_bytes: u32,
    write_timeout: Duration,
}

type BoxedWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The largest answer data a blocking thread writes itself. A small answer waits on the hops
/// (writing it is quick); a large one may fill the socket, and a blocking thread waiting for room
/// (through the runtime's I/O driver) holds the write half from the writer task, which batches
/// large answers better: those are queued.
const DIRECT_WRITE_MAX: usize = CACHED_READ_MAX as usize;

impl AnswerOut {
    fn new(w: BoxedWrite, max_frame_bytes: u32, write_timeout: Duration) -> AnswerOut {
        AnswerOut {
            out: tokio::sync::Mutex::new(Some(BufWriter::with_capacity(WRITE_BUFFER_BYTES, w))),
            broken: CancellationToken::new(),
            max_frame_bytes,
            write_timeout,
        }
    }

    /// On a blocking-pool thread: writes and flushes a small `answer` here when nothing is queued
    /// for the writer task and it is idle, so it goes out exactly when it would have from the
    /// queue, without waking a runtime thread. Gives the answer back otherwise (`Some`). Answers
    /// carry their ids, so one written here ahead of one queued a moment later is in order for
    /// the client.
    fn write_now(&self, queue: &mpsc::Sender<Answer>, answer: Answer) -> Option<Answer> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return Some(answer) };
        rt.block_on(self.write_direct(queue, answer))
    }

    /// As [`AnswerOut::write_now`], for a caller on the runtime (the session's reader).
    async fn write_direct(&self, queue: &mpsc::Sender<Answer>, answer: Answer) -> Option<Answer> {
        if answer.1.len() > DIRECT_WRITE_MAX || queue.capacity() != WRITER_QUEUE {
            return Some(answer);
        }
        let Ok(mut guard) = self.out.try_lock() else { return Some(answer) };
        let Some(out) = guard.as_mut() else { return Some(answer) };
        let (max, limit) = (self.max_frame_bytes, self.write_timeout);
        let written = async {
            write_answer(out, answer, max, limit).await?;
            with_timeout(out.flush(), "flush", limit).await
        }
        .await;
        if let Err(e) = written {
            debug!(error = %e, "writing an answer failed; closing the connection");
            *guard = None;
            self.broken.cancel();
        }
        None
    }
}

/// Writes one answer into the buffer; its read-budget share is given back once its data is.
async fn write_answer(out: &mut BufWriter<BoxedWrite>, answer: Answer, max: u32, limit: Duration) -> io::Result<()> {
    let (header, data, _budget) = answer;
    let written = tokio::time::timeout(limit, write_frame(out, &header, &data, max)).await;
    match written {
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
        Ok(Ok(())) => Ok(()),
        Ok(Err(FrameError::TooLong { len, max })) => {
            // Nothing was written; the client still gets an answer for its id.
            error!(id = header.id.0, len, max, "answer too large for a frame");
            let err = ResponseHeader { id: header.id, result: Err(WireError::new(ErrorCode::Io, "answer too large")) };
            let again = write_frame(out, &err, &[], max);
            with_timeout(async { again.await.map_err(io::Error::other) }, "write", limit).await
        }
        Ok(Err(FrameError::Io(e))) => Err(e),
        Ok(Err(e)) => Err(io::Error::other(e)),
    }
}

/// The writer task: sends answers in the order they are queued, flushing whenever the queue is
/// empty; each write and flush is bounded by `write_timeout`. Ends when every sender is gone (after
/// a flush and TLS close_notify), on the first failed write, or when a direct write failed.
async fn write_answers(out: Arc<AnswerOut>, mut rx: mpsc::Receiver<Answer>) -> io::Result<()> {
    let broken = || io::Error::new(io::ErrorKind::BrokenPipe, "a direct write failed");
    let (max, limit) = (out.max_frame_bytes, out.write_timeout);
    loop {
        let first = tokio::select! {
            _ = out.broken.cancelled() => return Err(broken()),
            answer = rx.recv() => answer,
        };
        let Some(first) = first else { break };
        let mut guard = out.out.lock().await;
        let Some(w) = guard.as_mut() else { return Err(broken()) };
        let mut next = Some(first);
        let result = async {
            while let Some(answer) = next.take() {
                write_answer(w, answer, max, limit).await?;
                next = rx.try_recv().ok();
            }
            with_timeout(w.flush(), "flush", limit).await
        }
        .await;
        if let Err(e) = result {
            *guard = None;
            return Err(e);
        }
    }
    let mut guard = out.out.lock().await;
    let Some(w) = guard.as_mut() else { return Err(broken()) };
    with_timeout(w.flush(), "flush", limit).await?;
    with_timeout(w.shutdown(), "close", limit).await
}

/// Bounds one phase; the error names the phase (tokio-rustls examples' `with_timeout`).
async fn with_timeout<T>(
    fut: impl Future<Output = io::Result<T>>,
    phase: &'static str,
    limit: Duration,
) -> io::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("{phase} timed out after {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homefs_shared::MAX_FRAME_BYTES;
    use std::collections::HashMap;

    fn answer(i: u64) -> Answer {
        let data = Bytes::from(vec![i as u8; 1000 + i as usize * 37]);
        (ResponseHeader { id: RequestId(i), result: Ok(Response::Data { size: i }) }, data, None)
    }

    /// The client's side: every answer until the stream ends, by id, checked against [`answer`].
    async fn read_answers(client: tokio::io::DuplexStream) -> HashMap<u64, usize> {
        let mut frames = FramedRead::new(client, FrameCodec::new(MAX_FRAME_BYTES));
        let mut seen = HashMap::new();
        while let Some(frame) = frames.next().await {
            let frame = frame.expect("a whole frame");
            let header = frame.response().expect("an answer");
            let (_, want, _) = answer(header.id.0);
            assert_eq!(header.result, Ok(Response::Data { size: header.id.0 }), "answer {}", header.id.0);
            assert_eq!(frame.data, want, "data of answer {}", header.id.0);
            *seen.entry(header.id.0).or_insert(0) += 1;
        }
        seen
    }

    /// Answers written by blocking threads themselves and answers queued for the writer task, at
    /// the same time, reach the client whole: each id once, with its own data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_answers_arrive_whole() {
        let (client, server) = tokio::io::duplex(64 << 10);
        let out = Arc::new(AnswerOut::new(Box::new(server), MAX_FRAME_BYTES, Duration::from_secs(10)));
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = tokio::spawn(write_answers(out.clone(), rx));
        let reading = tokio::spawn(read_answers(client));
        // Nothing queued and the writer idle: every answer goes out directly.
        let (o, t) = (out.clone(), tx.clone());
        let direct =
            tokio::task::spawn_blocking(move || (1..=50).filter(|&i| o.write_now(&t, answer(i)).is_none()).count());
        assert_eq!(direct.await.expect("thread"), 50, "answers written by the thread that made them");
        // Now both ways at once, from four threads.
        let mut threads = Vec::new();
        for t in 0..4u64 {
            let (out, tx) = (out.clone(), tx.clone());
            threads.push(tokio::task::spawn_blocking(move || {
                for i in (100 + t * 100)..(200 + t * 100) {
                    let queued = if t % 2 == 0 { out.write_now(&tx, answer(i)) } else { Some(answer(i)) };
                    if let Some(a) = queued {
                        tx.blocking_send(a).expect("writer alive");
                    }
                }
            }));
        }
        for t in threads {
            t.await.expect("thread");
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), writer).await.expect("writer ends").expect("task").expect("ok");
        let seen = tokio::time::timeout(Duration::from_secs(10), reading).await.expect("reader ends").expect("task");
        assert_eq!(seen.len(), 450);
        assert!(seen.values().all(|&n| n == 1), "each answer exactly once");
    }

    /// A slow read in place turns reads in place off for a while, each slow one in a row for
    /// twice as long up to the cap; a fast one makes the next pause short again.
    #[tokio::test]
    async fn slow_reads_in_place_turn_them_off_for_a_growing_while() {
        let mut p = InPlace::default();
        assert!(p.allowed(), "on at first");
        p.took(Duration::from_millis(1));
        assert!(p.allowed(), "a fast read changes nothing");
        p.took(IN_PLACE_SLOW);
        assert!(!p.allowed(), "off right after a slow read");
        assert_eq!(p.off_for, IN_PLACE_OFF_FIRST * 2, "the next pause is longer");
        for _ in 0..10 {
            p.took(IN_PLACE_SLOW * 3);
        }
        assert_eq!(p.off_for, IN_PLACE_OFF_MAX, "capped");
        let until = p.off_until.expect("off");
        assert!(until <= Instant::now() + IN_PLACE_OFF_MAX, "never off for longer than the cap");
        p.took(Duration::from_millis(2));
        assert_eq!(p.off_for, IN_PLACE_OFF_FIRST, "a fast read resets the pause");
        p.off_until = Some(Instant::now());
        assert!(p.allowed(), "on again once the pause is over");
    }

    /// A direct write that fails (the client went) ends the writer task, which closes the queue
    /// and so ends the session; the answer is not queued again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_direct_write_ends_the_writer() {
        let (client, server) = tokio::io::duplex(1 << 10);
        drop(client);
        let out = Arc::new(AnswerOut::new(Box::new(server), MAX_FRAME_BYTES, Duration::from_secs(10)));
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = tokio::spawn(write_answers(out.clone(), rx));
        let (o, t) = (out.clone(), tx.clone());
        let taken = tokio::task::spawn_blocking(move || o.write_now(&t, answer(7)).is_none());
        assert!(taken.await.expect("thread"), "the answer was taken (and its write failed)");
        let ended = tokio::time::timeout(Duration::from_secs(10), writer).await.expect("writer ends").expect("task");
        assert!(ended.is_err(), "the writer reports the broken stream");
        tokio::time::timeout(Duration::from_secs(10), tx.closed()).await.expect("queue closed");
    }
}
