//! One connection, from TLS handshake to close: the version check, login, then every request
//! handled concurrently, with a writer task that owns the write half.
//!
//! ```text
//! reader (this task) --spawn--> one task per request --(bounded channel)--> writer task --> TLS
//! ```
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
    login_code, ErrorCode, Frame, FrameError, Request, RequestId, Response, ResponseHeader, WireError, PROTOCOL_VERSION,
};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::{debug, error, info, warn, Instrument};

use crate::accounts::Login;
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

/// An answer, the data that follows it in its frame, and the share of the server's read budget
/// that data holds until it is sent.
type Answer = (ResponseHeader, Bytes, Option<OwnedSemaphorePermit>);

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
    let writer = tokio::spawn(
        write_answers(write_half, rx, limits.max_frame_bytes, limits.write_timeout_secs).in_current_span(),
    );

    let mut requests = 0u64;
    let end = match greet_and_login(&mut frames, &tx, &state, peer, id, &mut shutdown).await {
        Err(end) => end,
        Ok((authed, _user_permit)) => {
            let mut tasks = JoinSet::new();
            let end = serve_requests(&mut frames, &tx, &state, &authed, &mut tasks, &mut requests, &mut shutdown).await;
            drop(frames);
            // In-flight requests finish (by the server's shutdown deadline, or within the
            // shutdown timeout when the client went), then the session's locks and files go.
            let finish_by = shutdown.deadline().unwrap_or_else(|| Instant::now() + limits.shutdown_timeout_secs);
            if tokio::time::timeout_at(finish_by, drain(&mut tasks)).await.is_err() {
                warn!(left = tasks.len(), "in-flight requests still running at the deadline; cancelling them");
                tasks.abort_all();
                drain(&mut tasks).await;
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

/// After login: reads requests and hands each to its own task, until the connection ends.
async fn serve_requests<R: AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    tx: &mpsc::Sender<Answer>,
    state: &State,
    authed: &Arc<AuthedSession>,
    tasks: &mut JoinSet<()>,
    requests: &mut u64,
    shutdown: &mut Shutdown,
) -> End {
    let limits = &state.config.limits;
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_session));
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
        *requests += 1;
        let id = header.id;
        // Deleting a user ends their sessions too, not only their tokens: checked per request
        // (one map lookup), so an idle session ends at its next request or its idle timeout.
        if !state.accounts.exists(authed.user()) {
            warn!(user = authed.user(), "user deleted; ending the session");
            let _ = answer(tx, id, Err(WireError::new(ErrorCode::Access, "user deleted"))).await;
            return End::Revoked;
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
        let (tx, authed) = (tx.clone(), authed.clone());
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
                let (result, data) = match outcome {
                    Ok(Ok((response, data))) => (Ok(response), data),
                    Ok(Err(e)) => (Err(e), Bytes::new()),
                    Err(_) => {
                        error!(id = id.0, "request handler panicked");
                        (Err(WireError::new(ErrorCode::Io, "internal server error")), Bytes::new())
                    }
                };
                // Fails only when the writer is gone; the reader notices that itself.
                let _ = tx.send((ResponseHeader { id, result }, data, held)).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
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

/// The writer task: sends answers in the order they are queued, flushing whenever the queue is
/// empty; each write and flush is bounded by `write_timeout`. Ends when every sender is gone (after
/// a flush and TLS close_notify) or on the first failed write.
async fn write_answers<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Answer>,
    max_frame_bytes: u32,
    write_timeout: Duration,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    loop {
        // `_budget` is the answer's read-budget share, given back once its data is written.
        let (header, data, _budget) = match rx.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty) => {
                with_timeout(out.flush(), "flush", write_timeout).await?;
                match rx.recv().await {
                    Some(answer) => answer,
                    None => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let written = tokio::time::timeout(write_timeout, write_frame(&mut out, &header, &data, max_frame_bytes)).await;
        match written {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
            Ok(Ok(())) => {}
            Ok(Err(FrameError::TooLong { len, max })) => {
                // Nothing was written; the client still gets an answer for its id.
                error!(id = header.id.0, len, max, "answer too large for a frame");
                let err =
                    ResponseHeader { id: header.id, result: Err(WireError::new(ErrorCode::Io, "answer too large")) };
                let again = write_frame(&mut out, &err, &[], max_frame_bytes);
                with_timeout(async { again.await.map_err(io::Error::other) }, "write", write_timeout).await?;
            }
            Ok(Err(FrameError::Io(e))) => return Err(e),
            Ok(Err(e)) => return Err(io::Error::other(e)),
        }
    }
    with_timeout(out.flush(), "flush", write_timeout).await?;
    with_timeout(out.shutdown(), "close", write_timeout).await
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
