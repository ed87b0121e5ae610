//! The connection both binaries share: TLS, handshake, login, and a multiplexed request stream
//! that survives a lost connection (it logs in again with the session token).
//!
//! OWNED BY: the client work (client/). netmount (fuse/) and netcp (copy/) use only the public
//! API declared here; its signatures are the contract between the three.
//!
//! Handles ([`Fh`]) returned by [`Client::open`] are the client's own: they stay valid across a
//! reconnect (the file is reopened by path on the new connection, and a rename through this
//! client updates the path of its open handles).

use bytes::Bytes;
use homefs_shared::{
    Attr, DirEntry, ErrorCode, Fh, FileItem, LockSpec, OpenFlags, PutItem, RemoveItem, RenameFlags, Request, Response,
    SetAttr, StatFs, StoredItem, Timestamp, WireError, WirePath, MAX_DATA_BYTES,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

mod addr;
mod connect;
mod handles;
pub mod known_hosts;
pub mod login_args;
mod mux;
mod stats;

pub use addr::AddrError;
pub use login_args::LoginArgs;
pub use mux::{Notice, NoticeFn};

use handles::{Handles, Lookup};
use mux::{Conn, Mux, ReplyFn, SendError};

/// Called once with the answer of [`Client::read_detached`]: the data and the file's size.
pub type ReadDone = Box<dyn FnOnce(Result<(Bytes, u64), WireError>) + Send>;

/// The default of [`ConnectOptions::reconnect_timeout`]: how long a call waits for a lost
/// connection to come back before it fails with EIO.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of [`ConnectOptions::max_in_flight`]: the server's per-session default, so the
/// client never queues more than the server would work on at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// How many times one call is sent at most: a request that kills the connection each time it is
/// sent must not be retried forever, even when reconnects are quick.
const MAX_ATTEMPTS: u32 = 4;
/// Entries asked for per `ReadDir` page by [`Client::read_dir`] (the server may send fewer).
const READ_DIR_PAGE: u32 = 4096;

/// Where the server is: `[USER@]HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

/// How the server's certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// `--fingerprint SHA256:...`
    Fingerprint(String),
    /// `--ca FILE`
    Ca(PathBuf),
    /// known_hosts (XDG config dir); `accept_new` pins an unknown host without asking.
    KnownHosts { file: PathBuf, accept_new: bool },
}

/// Asks for the password, after the server's certificate is trusted (as ssh asks after the host
/// key). Called again never: reconnects use the session token.
pub type PasswordFn = Box<dyn FnOnce() -> anyhow::Result<String> + Send>;

/// Everything needed to connect and log in.
pub struct ConnectOptions {
    pub server: ServerAddr,
    pub user: String,
    pub trust: Trust,
    /// Whether the client may ask on the terminal (an unknown certificate); when false, an
    /// unknown certificate without `accept_new` is an error.
    pub interactive: bool,
    /// How long a call waits for the connection to come back before it fails with EIO (30 s).
    pub reconnect_timeout: Duration,
    /// The most requests in flight at once (bounded, for memory and fairness).
    pub max_in_flight: usize,
    /// Sent in Hello, for the server's log (e.g. "netmount 0.1.0").
    pub client_name: String,
}

/// Why connecting failed; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable { addr: String, source: std::io::Error },
    #[error("login denied (401)")]
    Denied,
    #[error("unknown server certificate {fingerprint}; no terminal to ask (use --accept-new or --fingerprint)")]
    UnknownHost { fingerprint: String },
    #[error("server certificate CHANGED for {host}: expected {expected}, got {got}; refusing to connect (if this is expected, remove the line from {known_hosts})")]
    HostKeyChanged { host: String, expected: String, got: String, known_hosts: String },
    #[error("certificate not accepted")]
    NotAccepted,
    #[error("protocol version mismatch: {0}")]
    Version(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

/// A logged-in connection. Cheap to clone; all clones share one TLS connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    user: String,
    fingerprint: String,
    mux: Arc<Mux>,
    /// Caps the requests in flight ([`ConnectOptions::max_in_flight`]).
    in_flight: Semaphore,
    reconnect_timeout: Duration,
    handles: Handles,
    /// Requests sent, by kind (the profile of a workload in round trips).
    counts: stats::Counts,
    /// Whether the server takes `Remove` batches: [`BATCH_UNKNOWN`], [`BATCH_YES`], [`BATCH_NO`].
    removes: AtomicU8,
}

/// No `Remove` answered or refused yet.
const BATCH_UNKNOWN: u8 = 0;
/// A `Remove` was answered: the server knows it.
const BATCH_YES: u8 = 1;
/// The server refused a `Remove` (an older server): single requests from now on.
const BATCH_NO: u8 = 2;

impl Drop for Inner {
    /// The last clone is gone: stop reconnecting and close the connection.
    fn drop(&mut self) {
        self.mux.shut_down();
    }
}

/// One place of [`Inner::in_flight`] held by a detached request (whose callback cannot borrow
/// the semaphore); given back on drop.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.add_permits(1);
    }
}

/// How one attempt on a connection went wrong before the request itself was sent.
enum Attempt {
    /// A final answer for the caller.
    Failed(WireError),
    /// The connection failed; the attempt may be made again on the next one.
    Lost(SendError),
}

/// Whether a request may be sent again on a new connection after the old one died with it in
/// flight. Only requests that change nothing, or whose repetition has the same effect, qualify.
/// The others (mkdir, unlink, rename, write, link, copy, lock...) may already have been applied
/// by the server before the connection died: repeating them could fail for the wrong reason
/// (EEXIST after a mkdir that worked), apply twice (an append), or take a lock twice, so they
/// fail with EIO and the caller decides.
fn is_idempotent(r: &Request) -> bool {
    match r {
        Request::Stat { .. }
        | Request::ReadDir { .. }
        | Request::Read { .. }
        | Request::ReadLink { .. }
        | Request::StatFs
        | Request::Checksum { .. }
        | Request::TestLock { .. }
        | Request::Ping
        // fsync flushes the file's data whichever descriptor it comes through.
        | Request::Fsync { .. }
        // Setting a mode, a size or a time twice leaves the same result.
        | Request::SetAttr { .. } => true,
        Request::Open { flags, .. } => !flags.exclusive && !flags.truncate,
        Request::Lock { lock, .. } => lock.kind == homefs_shared::LockKind::Unlock,
        _ => false,
    }
}

fn unexpected(what: &str) -> WireError {
    WireError::new(ErrorCode::Protocol, format!("unexpected answer to {what}"))
}

fn lost_error(e: SendError) -> WireError {
    match e {
        SendError::TimedOut => WireError::new(ErrorCode::TimedOut, "no answer from the server in time"),
        SendError::NotSent | SendError::Lost => WireError::new(
            ErrorCode::Io,
            "connection lost while the request was in flight; the server may have applied it, so it is not repeated",
        ),
    }
}

impl Client {
    /// Connects, checks the certificate, says Hello, and logs in.
    ///
    /// # Errors
    /// [`ConnectError`], one variant per reason the user must act on.
    pub async fn connect(opts: ConnectOptions, password: PasswordFn) -> Result<Client, ConnectError> {
        let est = connect::establish(&opts, password).await?;
        tracing::info!(server = %opts.server.host_port(), user = %opts.user, "logged in (201)");
        let mux = Mux::start(est.dialer, est.transport, est.token);
        Ok(Client {
            inner: Arc::new(Inner {
                user: opts.user,
                fingerprint: est.fingerprint,
                mux,
                in_flight: Semaphore::new(opts.max_in_flight.max(1)),
                reconnect_timeout: opts.reconnect_timeout,
                handles: Handles::default(),
                counts: stats::Counts::default(),
                removes: AtomicU8::new(BATCH_UNKNOWN),
            }),
        })
    }

    /// The logged-in user.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// The server's certificate fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// How many times the connection was made again after a loss (0 on the first connection).
    pub fn reconnects(&self) -> u64 {
        self.inner.mux.reconnects()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.mux.current().is_some()
    }

    /// Drops the current connection as a network failure would; the client then reconnects with
    /// its token. For tests of connection loss and for a user's "reconnect now".
    pub fn break_connection(&self) {
        self.inner.mux.break_connection();
    }

    /// Sets how long the connection may stay idle before the client sends a keepalive `Ping`
    /// (30 s by default; keep it under the server's `idle_timeout_secs`).
    pub fn set_keepalive(&self, idle: Duration) {
        self.inner.mux.set_keepalive(idle);
    }

    /// Asks the server for change notices (`Subscribe`) on this connection and every later one:
    /// `to` gets each `Notice` (see [`NoticeFn`] for what it may do). After a reconnect, `to` gets
    /// `Notice::Reconnected` once the new connection is subscribed (notices of the gap are lost).
    ///
    /// # Errors
    /// The server's refusal (an older server: `Protocol`), or the connection's failure.
    pub async fn subscribe(&self, to: NoticeFn) -> Result<(), WireError> {
        self.inner.mux.subscribe(to, self.inner.reconnect_timeout).await
    }

    /// How many handles from [`Client::open`] are not yet closed.
    pub fn open_handles(&self) -> usize {
        self.inner.handles.len()
    }

    /// How many requests of each kind this client has sent (kinds never sent are left out):
    /// the round trips a workload cost.
    pub fn request_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.counts.snapshot()
    }

    /// Sends any request and waits for its answer (bounded by the reconnect timeout).
    ///
    /// File handles in the request and in an `Opened` answer are the client's own, as with the
    /// typed methods. `Hello`, `Login` and `Resume` are the client's business and refused here.
    ///
    /// # Errors
    /// The server's error, or `Io`/`TimedOut` when the connection could not be restored in time.
    pub async fn call(&self, request: Request, data: Bytes) -> Result<(Response, Bytes), WireError> {
        match request {
            Request::Hello { .. } | Request::Login { .. } | Request::Resume { .. } => {
                Err(WireError::new(ErrorCode::Protocol, "the client handles hello and login itself"))
            }
            Request::Open { path, flags, mode } => {
                let (fh, attr) = self.open(&path, flags, mode).await?;
                Ok((Response::Opened { fh, attr }, Bytes::new()))
            }
            Request::Close { fh } => self.close(fh).await.map(|()| (Response::Done, Bytes::new())),
            Request::Rename { from, to, flags } => {
                self.rename(&from, &to, flags).await.map(|()| (Response::Done, Bytes::new()))
            }
            other => self.exec(other, data).await.map(|(r, d, _)| (r, d)),
        }
    }

    /// Runs one request: waits for a connection (up to the reconnect timeout), maps client
    /// handles to the server's (reopening after a reconnect), and retries on a new connection
    /// when that is safe. Returns the answer and the epoch of the connection that gave it.
    async fn exec(&self, request: Request, data: Bytes) -> Result<(Response, Bytes, u64), WireError> {
        let _permit = self.inner.in_flight.acquire().await.expect("the in-flight semaphore is never closed");
        let wait = self.inner.reconnect_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        let retry_ok = is_idempotent(&request);
        for attempt in 1.. {
            if attempt > MAX_ATTEMPTS {
                return Err(WireError::new(
                    ErrorCode::Io,
                    format!("connection lost {MAX_ATTEMPTS} times during this request"),
                ));
            }
            let conn = self.inner.mux.conn(deadline, wait).await?;
            let sent = match self.translate(&conn, &request).await {
                Ok(r) => r,
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Lost(SendError::TimedOut)) => return Err(lost_error(SendError::TimedOut)),
                Err(Attempt::Lost(_)) => continue,
            };
            self.inner.counts.count(&sent);
            match conn.request(sent, data.clone()).await {
                Ok((Ok(resp), data)) => return Ok((resp, data, conn.epoch)),
                Ok((Err(e), _)) => return Err(e),
                Err(SendError::NotSent) => continue,
                Err(SendError::Lost) if retry_ok => continue,
                Err(e) => return Err(lost_error(e)),
            }
        }
        unreachable!("the loop returns by its attempt limit at the latest")
    }

    /// One attempt of `request` (no handles in it) on the current connection; on failure, also
    /// whether it was written and then lost (the server may have read it).
    async fn exec_written(&self, request: Request) -> Result<(Response, Bytes, u64), (WireError, bool)> {
        let _permit = self.inner.in_flight.acquire().await.expect("the in-flight semaphore is never closed");
        let wait = self.inner.reconnect_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        let conn = self.inner.mux.conn(deadline, wait).await.map_err(|e| (e, false))?;
        self.inner.counts.count(&request);
        match conn.request(request, Bytes::new()).await {
            Ok((Ok(resp), data)) => Ok((resp, data, conn.epoch)),
            Ok((Err(e), _)) => Err((e, false)),
            Err(SendError::Lost) => Err((lost_error(SendError::Lost), true)),
            Err(e) => Err((lost_error(e), false)),
        }
    }

    /// The request with client handles replaced by the server's handles on `conn`.
    async fn translate(&self, conn: &Arc<Conn>, request: &Request) -> Result<Request, Attempt> {
        let mut r = request.clone();
        match &mut r {
            Request::Read { fh, .. }
            | Request::Write { fh, .. }
            | Request::WriteAttr { fh, .. }
            | Request::Close { fh }
            | Request::Fsync { fh, .. }
            | Request::Lock { fh, .. }
            | Request::TestLock { fh, .. }
            | Request::SetAttr { fh: Some(fh), .. } => *fh = self.server_fh(conn, *fh).await?,
            Request::CopyRange { src, dst, .. } => {
                *src = self.server_fh(conn, *src).await?;
                *dst = self.server_fh(conn, *dst).await?;
            }
            _ => {}
        }
        Ok(r)
    }

    /// The server's handle for `fh` on `conn`, reopening the file by path if it was opened on an
    /// earlier connection.
    async fn server_fh(&self, conn: &Arc<Conn>, fh: Fh) -> Result<Fh, Attempt> {
        let handles = &self.inner.handles;
        let (path, flags, mode) = match handles.lookup(fh, conn.epoch) {
            Lookup::Ready(s) => return Ok(s),
            Lookup::Unknown => return Err(Attempt::Failed(WireError::new(ErrorCode::BadHandle, "no such open file"))),
            Lookup::Stale => {
                return Err(Attempt::Failed(WireError::new(
                    ErrorCode::Stale,
                    "file could not be reopened after a reconnect",
                )))
            }
            Lookup::Reopen { path, flags, mode } => (path, flags, mode),
        };
        let reopen = Request::Open { path: path.clone(), flags, mode };
        self.inner.counts.count(&reopen);
        let answer = conn.request(reopen, Bytes::new()).await;
        match answer {
            Ok((Ok(Response::Opened { fh: server, .. }), _)) => match handles.reopened(fh, conn.epoch, server) {
                Some((use_fh, extra)) => {
                    if let Some(extra) = extra {
                        close_in_background(conn, extra);
                    }
                    Ok(use_fh)
                }
                None => {
                    // Closed by another task while we reopened it.
                    close_in_background(conn, server);
                    Err(Attempt::Failed(WireError::new(ErrorCode::BadHandle, "file closed")))
                }
            },
            Ok((Ok(_), _)) => Err(Attempt::Failed(unexpected("Open"))),
            Ok((Err(e), _)) => {
                tracing::warn!(path = %path, error = %e, "cannot reopen a file after a reconnect");
                handles.mark_stale(fh);
                Err(Attempt::Failed(WireError::new(
                    ErrorCode::Stale,
                    format!("{path}: cannot reopen after a reconnect: {e}"),
                )))
            }
            Err(e) => Err(Attempt::Lost(e)),
        }
    }

    pub async fn stat(&self, path: &WirePath) -> Result<Attr, WireError> {
        match self.exec(Request::Stat { path: path.clone() }, Bytes::new()).await?.0 {
            Response::Attr(a) => Ok(a),
            _ => Err(unexpected("Stat")),
        }
    }

    /// One page of a directory (see `Request::ReadDir`); returns the entries and whether more remain.
    pub async fn read_dir_page(
        &self,
        path: &WirePath,
        after: Option<Vec<u8>>,
        max_entries: u32,
    ) -> Result<(Vec<DirEntry>, bool), WireError> {
        match self.exec(Request::ReadDir { path: path.clone(), after, max_entries }, Bytes::new()).await?.0 {
            Response::Entries { entries, more } => Ok((entries, more)),
            _ => Err(unexpected("ReadDir")),
        }
    }

    /// A whole directory, all pages.
    pub async fn read_dir(&self, path: &WirePath) -> Result<Vec<DirEntry>, WireError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = self.read_dir_page(path, after, READ_DIR_PAGE).await?;
            let last = page.last().map(|e| e.name.clone());
            all.extend(page);
            match (more, last) {
                (true, Some(name)) => after = Some(name),
                // `more` with an empty page would loop forever: treat it as the end.
                _ => return Ok(all),
            }
        }
    }

    pub async fn mkdir(&self, path: &WirePath, mode: u32) -> Result<Attr, WireError> {
        match self.exec(Request::Mkdir { path: path.clone(), mode }, Bytes::new()).await?.0 {
            Response::Attr(a) => Ok(a),
            _ => Err(unexpected("Mkdir")),
        }
    }

    pub async fn rmdir(&self, path: &WirePath) -> Result<(), WireError> {
        self.exec(Request::Rmdir { path: path.clone() }, Bytes::new()).await.map(drop)
    }

    pub async fn unlink(&self, path: &WirePath) -> Result<(), WireError> {
        self.exec(Request::Unlink { path: path.clone() }, Bytes::new()).await.map(drop)
    }

    /// Renames, and moves the paths of this client's open handles at or below `from` (both ways
    /// with `exchange`), so that they can be reopened after a reconnect.
    pub async fn rename(&self, from: &WirePath, to: &WirePath, flags: RenameFlags) -> Result<(), WireError> {
        self.exec(Request::Rename { from: from.clone(), to: to.clone(), flags }, Bytes::new()).await?;
        self.inner.handles.renamed(from, to, flags.exchange);
        Ok(())
    }

    pub async fn open(&self, path: &WirePath, flags: OpenFlags, mode: u32) -> Result<(Fh, Attr), WireError> {
        match self.exec(Request::Open { path: path.clone(), flags, mode }, Bytes::new()).await? {
            (Response::Opened { fh, attr }, _, epoch) => {
                Ok((self.inner.handles.insert(path.clone(), flags, mode, epoch, fh), attr))
            }
            _ => Err(unexpected("Open")),
        }
    }

    /// Up to `len` bytes at `offset`; fewer only at end of file. Also returns the file's size.
    /// A `len` over [`MAX_DATA_BYTES`] is read in several requests.
    pub async fn read(&self, fh: Fh, offset: u64, len: u32) -> Result<(Bytes, u64), WireError> {
        if len <= MAX_DATA_BYTES {
            return self.read_once(fh, offset, len).await;
        }
        let mut buf = bytes::BytesMut::with_capacity(len as usize);
        let mut size = 0;
        while buf.len() < len as usize {
            let want = (len - buf.len() as u32).min(MAX_DATA_BYTES);
            let (data, s) = self.read_once(fh, offset + buf.len() as u64, want).await?;
            size = s;
            buf.extend_from_slice(&data);
            if data.len() < want as usize {
                break;
            }
        }
        Ok((buf.freeze(), size))
    }

    /// As [`Client::read`], but returns once the request is sent: `done` gets the answer exactly
    /// once, called by the task that receives it (the connection's reader), so that the caller's
    /// thread neither waits nor is woken. For a lone small read (a 4 KiB random read at queue
    /// depth 1) that is one thread hop less. When that cannot be done at once (no connection up,
    /// a handle to reopen, all in-flight places taken, a large read), and when the connection dies
    /// under it, the read goes the usual way ([`Client::read`], with its waits and retries) on a
    /// task. Call from within the runtime's context (a task, or `Handle::block_on`).
    pub async fn read_detached(&self, fh: Fh, offset: u64, len: u32, done: ReadDone) {
        // Held for the callback, which may run on a thread outside the runtime (`kill`).
        let rt = tokio::runtime::Handle::current();
        let Some((conn, server_fh, permit)) = self.detached_slot(fh, len) else {
            return self.read_later(&rt, fh, offset, len, done);
        };
        let request = Request::Read { fh: server_fh, offset, len };
        self.inner.counts.count(&request);
        let client = self.clone();
        let answered: ReplyFn = Box::new(move |reply| {
            drop(permit);
            match reply {
                Ok((Ok(Response::Data { size }), data)) => done(Ok((data, size))),
                Ok((Ok(_), _)) => done(Err(unexpected("Read"))),
                Ok((Err(e), _)) => done(Err(e)),
                // Not sent, or lost with the connection: a read may be sent again.
                Err(SendError::NotSent | SendError::Lost) => client.read_later(&rt, fh, offset, len, done),
                Err(e @ SendError::TimedOut) => done(Err(lost_error(e))),
            }
        });
        conn.request_detached(request, Bytes::new(), answered).await;
    }

    /// What a detached read needs, if all of it is there without waiting: the connection, the
    /// server's handle on it, and an in-flight place (given back when the guard drops).
    fn detached_slot(&self, fh: Fh, len: u32) -> Option<(Arc<Conn>, Fh, InFlight)> {
        if len > MAX_DATA_BYTES {
            return None;
        }
        let conn = self.inner.mux.current()?;
        let Lookup::Ready(server_fh) = self.inner.handles.lookup(fh, conn.epoch) else { return None };
        self.inner.in_flight.try_acquire().ok()?.forget();
        Some((conn, server_fh, InFlight(self.inner.clone())))
    }

    /// The read the usual way on a new task; `done` gets its answer.
    fn read_later(&self, rt: &tokio::runtime::Handle, fh: Fh, offset: u64, len: u32, done: ReadDone) {
        let client = self.clone();
        rt.spawn(async move { done(client.read(fh, offset, len).await) });
    }

    async fn read_once(&self, fh: Fh, offset: u64, len: u32) -> Result<(Bytes, u64), WireError> {
        match self.exec(Request::Read { fh, offset, len }, Bytes::new()).await? {
            (Response::Data { size }, data, _) => Ok((data, size)),
            _ => Err(unexpected("Read")),
        }
    }

    /// Writes all of `data` at `offset`; returns the file's size after the write. More than
    /// [`MAX_DATA_BYTES`] goes in several requests, in order.
    pub async fn write(&self, fh: Fh, offset: u64, data: Bytes) -> Result<u64, WireError> {
        let mut done = 0usize;
        loop {
            let n = (data.len() - done).min(MAX_DATA_BYTES as usize);
            let chunk = data.slice(done..done + n);
            let size = match self.exec(Request::Write { fh, offset: offset + done as u64 }, chunk).await? {
                (Response::Written { len, size }, _, _) if len as usize == n => size,
                (Response::Written { len, .. }, _, _) => {
                    return Err(WireError::new(ErrorCode::Io, format!("short write: {len} of {n} bytes")))
                }
                _ => return Err(unexpected("Write")),
            };
            done += n;
            if done >= data.len() {
                return Ok(size);
            }
        }
    }

    /// Writes all of `data` (at most [`MAX_DATA_BYTES`]) at `offset` in one request, and returns
    /// the file's attributes after the write (`WriteAttr`: no `Stat` needed to know them).
    ///
    /// # Errors
    /// As [`Client::write`]; `TooBig` for more than [`MAX_DATA_BYTES`].
    pub async fn write_attr(&self, fh: Fh, offset: u64, data: Bytes) -> Result<Attr, WireError> {
        if data.len() > MAX_DATA_BYTES as usize {
            return Err(WireError::new(ErrorCode::TooBig, "one write_attr takes at most MAX_DATA_BYTES"));
        }
        let n = data.len();
        match self.exec(Request::WriteAttr { fh, offset }, data).await? {
            (Response::WrittenAttr { len, attr }, _, _) if len as usize == n => Ok(attr),
            (Response::WrittenAttr { len, .. }, _, _) => {
                Err(WireError::new(ErrorCode::Io, format!("short write: {len} of {n} bytes")))
            }
            _ => Err(unexpected("WriteAttr")),
        }
    }

    /// Closes a handle. A handle whose connection is gone needs nothing sent: the server closed
    /// it when that session ended.
    pub async fn close(&self, fh: Fh) -> Result<(), WireError> {
        let (epoch, server) = match self.inner.handles.remove(fh) {
            None => return Err(WireError::new(ErrorCode::BadHandle, "no such open file")),
            Some(None) => return Ok(()),
            Some(Some(s)) => s,
        };
        let Some(conn) = self.inner.mux.current().filter(|c| c.epoch == epoch) else { return Ok(()) };
        let _permit = self.inner.in_flight.acquire().await.expect("the in-flight semaphore is never closed");
        let request = Request::Close { fh: server };
        self.inner.counts.count(&request);
        match conn.request(request, Bytes::new()).await {
            Ok((Ok(_), _)) => Ok(()),
            Ok((Err(e), _)) => Err(e),
            Err(SendError::TimedOut) => Err(lost_error(SendError::TimedOut)),
            // The connection died: the server closes the files of a session that ends.
            Err(_) => Ok(()),
        }
    }

    pub async fn setattr(&self, path: &WirePath, fh: Option<Fh>, set: SetAttr) -> Result<Attr, WireError> {
        match self.exec(Request::SetAttr { path: path.clone(), fh, set }, Bytes::new()).await?.0 {
            Response::Attr(a) => Ok(a),
            _ => Err(unexpected("SetAttr")),
        }
    }

    pub async fn symlink(&self, target: &[u8], path: &WirePath) -> Result<Attr, WireError> {
        match self.exec(Request::Symlink { target: target.to_vec(), path: path.clone() }, Bytes::new()).await?.0 {
            Response::Attr(a) => Ok(a),
            _ => Err(unexpected("Symlink")),
        }
    }

    pub async fn readlink(&self, path: &WirePath) -> Result<Vec<u8>, WireError> {
        match self.exec(Request::ReadLink { path: path.clone() }, Bytes::new()).await?.0 {
            Response::Target(t) => Ok(t),
            _ => Err(unexpected("ReadLink")),
        }
    }

    pub async fn link(&self, from: &WirePath, to: &WirePath) -> Result<Attr, WireError> {
        match self.exec(Request::Link { from: from.clone(), to: to.clone() }, Bytes::new()).await?.0 {
            Response::Attr(a) => Ok(a),
            _ => Err(unexpected("Link")),
        }
    }

    pub async fn fsync(&self, fh: Fh, datasync: bool) -> Result<(), WireError> {
        self.exec(Request::Fsync { fh, datasync }, Bytes::new()).await.map(drop)
    }

    pub async fn statfs(&self) -> Result<StatFs, WireError> {
        match self.exec(Request::StatFs, Bytes::new()).await?.0 {
            Response::StatFs(s) => Ok(s),
            _ => Err(unexpected("StatFs")),
        }
    }

    pub async fn copy_range(
        &self,
        src: Fh,
        src_offset: u64,
        dst: Fh,
        dst_offset: u64,
        len: u64,
    ) -> Result<u64, WireError> {
        let request = Request::CopyRange { src, src_offset, dst, dst_offset, len };
        match self.exec(request, Bytes::new()).await?.0 {
            Response::Copied { len } => Ok(len),
            _ => Err(unexpected("CopyRange")),
        }
    }

    /// BLAKE3 of `[start, end)`: (hash, bytes covered, file size, mtime).
    pub async fn checksum(
        &self,
        path: &WirePath,
        start: u64,
        end: u64,
    ) -> Result<([u8; 32], u64, u64, Timestamp), WireError> {
        match self.exec(Request::Checksum { path: path.clone(), start, end }, Bytes::new()).await?.0 {
            Response::Checksum { hash, len, size, mtime } => Ok((hash, len, size, mtime)),
            _ => Err(unexpected("Checksum")),
        }
    }

    /// One lock request (the caller re-sends on `WouldBlock` when it wants to keep waiting).
    pub async fn lock(&self, fh: Fh, lock: LockSpec, wait: bool) -> Result<(), WireError> {
        self.exec(Request::Lock { fh, lock, wait }, Bytes::new()).await.map(drop)
    }

    pub async fn test_lock(&self, fh: Fh, lock: LockSpec) -> Result<Option<LockSpec>, WireError> {
        match self.exec(Request::TestLock { fh, lock }, Bytes::new()).await?.0 {
            Response::LockTest(l) => Ok(l),
            _ => Err(unexpected("TestLock")),
        }
    }
}

impl Client {
    /// Stores `data` (at most [`MAX_DATA_BYTES`]) as the whole content of `path` in one request
    /// (`PutFile`): written beside it under a temporary name, given `mode` and `mtime`, and renamed
    /// into place (an existing file is replaced, unless `exclusive`). Not synced: see
    /// [`Client::sync_fs`]. Returns the server's BLAKE3 of what it stored and the new attributes.
    /// Not repeated after a lost connection (the caller decides; repeating is safe unless `exclusive`).
    ///
    /// # Errors
    /// `TooBig` for more than [`MAX_DATA_BYTES`]; the server's error (`QuotaExceeded`, `Exists`...).
    pub async fn put_file(
        &self,
        path: &WirePath,
        mode: u32,
        mtime: Option<Timestamp>,
        exclusive: bool,
        data: Bytes,
    ) -> Result<([u8; 32], Attr), WireError> {
        if data.len() > MAX_DATA_BYTES as usize {
            return Err(WireError::new(ErrorCode::TooBig, "one put_file takes at most MAX_DATA_BYTES"));
        }
        match self.exec(Request::PutFile { path: path.clone(), mode, mtime, exclusive }, data).await?.0 {
            Response::Stored { hash, attr } => Ok((hash, attr)),
            _ => Err(unexpected("PutFile")),
        }
    }

    /// Reads a whole file in one request (`GetFile`): its attributes, the first
    /// `min(size, max_len)` bytes (none for what is not a regular file) and the server's BLAKE3 of
    /// those bytes. Fewer bytes than `attr.size` means the rest must be read with `open`/`read`.
    ///
    /// # Errors
    /// The server's error (`NotFound`, ...), or the connection's.
    pub async fn get_file(&self, path: &WirePath, max_len: u32) -> Result<(Attr, [u8; 32], Bytes), WireError> {
        let request = Request::GetFile { path: path.clone(), max_len: max_len.min(MAX_DATA_BYTES) };
        match self.exec(request, Bytes::new()).await? {
            (Response::FileData { attr, hash }, data, _) => Ok((attr, hash, data)),
            _ => Err(unexpected("GetFile")),
        }
    }

    /// `syncfs` of the file system holding the home (`SyncFs`): returns once everything written
    /// before it (by any connection of this user) is on disk.
    ///
    /// # Errors
    /// The server's error (`Io` when the disk failed), or the connection's.
    pub async fn sync_fs(&self) -> Result<(), WireError> {
        self.exec(Request::SyncFs, Bytes::new()).await.map(drop)
    }
}

impl Client {
    /// Stores many small files in one request (`PutFiles`): `files[i]`'s content is the next
    /// `files[i].len` bytes of `data`; each is stored as [`Client::put_file`] stores one (not
    /// exclusive). Returns each file's outcome in order: the server's BLAKE3 of what it stored and
    /// the new attributes, or why that file was refused. Not repeated after a lost connection.
    ///
    /// # Errors
    /// For the whole batch: `TooBig` (more than [`homefs_shared::MAX_BATCH_FILES`] files or
    /// [`MAX_DATA_BYTES`] bytes), `Invalid` (lengths that do not add up), an older server's
    /// refusal (`Protocol`, `NoSys`, `NotSupported`, or a lost connection: it cannot decode the
    /// request), or the connection's.
    pub async fn put_files(
        &self,
        files: Vec<PutItem>,
        data: Bytes,
    ) -> Result<Vec<Result<StoredItem, WireError>>, WireError> {
        if files.len() > homefs_shared::MAX_BATCH_FILES || data.len() > MAX_DATA_BYTES as usize {
            return Err(WireError::new(ErrorCode::TooBig, "too large for one put_files"));
        }
        if files.iter().map(|f| u64::from(f.len)).sum::<u64>() != data.len() as u64 {
            return Err(WireError::new(ErrorCode::Invalid, "put_files: the lengths do not add up to the data"));
        }
        let n = files.len();
        match self.exec(Request::PutFiles { files }, data).await?.0 {
            Response::StoredFiles { results } if results.len() == n => Ok(results),
            _ => Err(unexpected("PutFiles")),
        }
    }

    /// Reads many small files in one request (`GetFiles`): each path's attributes, BLAKE3 and
    /// bytes, in order, at most `max_bytes` of bytes in all (a regular file that did not fit comes
    /// with its attributes and no bytes: read it on its own). The bytes are views of the one frame.
    ///
    /// # Errors
    /// For the whole batch: `TooBig` (more than [`homefs_shared::MAX_BATCH_FILES`] paths), an
    /// older server's refusal (as [`Client::put_files`]), or the connection's.
    pub async fn get_files(
        &self,
        paths: Vec<WirePath>,
        max_bytes: u32,
    ) -> Result<Vec<Result<(FileItem, Bytes), WireError>>, WireError> {
        if paths.len() > homefs_shared::MAX_BATCH_FILES {
            return Err(WireError::new(ErrorCode::TooBig, "too many paths for one get_files"));
        }
        let n = paths.len();
        let request = Request::GetFiles { paths, max_bytes: max_bytes.min(MAX_DATA_BYTES) };
        let (results, data) = match self.exec(request, Bytes::new()).await? {
            (Response::FilesData { results }, data, _) if results.len() == n => (results, data),
            _ => return Err(unexpected("GetFiles")),
        };
        let mut at = 0usize;
        let mut out = Vec::with_capacity(n);
        for r in results {
            out.push(match r {
                Ok(item) => {
                    let end = at + item.len as usize;
                    if end > data.len() {
                        return Err(WireError::new(ErrorCode::Protocol, "GetFiles: lengths past the data"));
                    }
                    let bytes = data.slice(at..end);
                    at = end;
                    Ok((item, bytes))
                }
                Err(e) => Err(e),
            });
        }
        if at != data.len() {
            return Err(WireError::new(ErrorCode::Protocol, "GetFiles: data beyond the lengths"));
        }
        Ok(out)
    }

    /// Makes what is at `paths` durable on the server (`Sync`: each file and directory, and each
    /// path's entry in its directory; at most [`homefs_shared::MAX_SYNC_PATHS`] paths): returns
    /// once it is on disk.
    ///
    /// # Errors
    /// The server's error (`Io` when the disk failed), an older server's refusal (as
    /// [`Client::put_files`]), or the connection's.
    pub async fn sync_paths(&self, paths: Vec<WirePath>) -> Result<(), WireError> {
        if paths.len() > homefs_shared::MAX_SYNC_PATHS {
            return Err(WireError::new(ErrorCode::TooBig, "too many paths for one sync"));
        }
        self.exec(Request::Sync { paths }, Bytes::new()).await.map(drop)
    }
}

impl Client {
    /// Whether [`Client::remove`] may be used: false once the server refused a `Remove` (an older
    /// server, PROTOCOL.md "Batched removes"); then send `Unlink`/`Rmdir` one by one.
    pub fn has_remove(&self) -> bool {
        self.inner.removes.load(Ordering::Relaxed) != BATCH_NO
    }

    /// Removes many names in one request (`Remove`): each item in order, as `Unlink` or `Rmdir`
    /// would. Returns each item's outcome in order; a failed item does not stop the others. Not
    /// repeated after a lost connection (the caller decides: a repeated item that had been
    /// removed answers `NotFound`) except while the server has not yet shown that it knows the
    /// request (an older server closes the connection on it, see [`Client::has_remove`]).
    ///
    /// # Errors
    /// For the whole batch: `TooBig` (more than [`homefs_shared::MAX_BATCH_FILES`] items), an
    /// older server's refusal (`Protocol`, `NoSys`, `NotSupported`, or `Io` for a connection lost
    /// twice before any `Remove` was answered; [`Client::has_remove`] is false from then on), or
    /// the connection's.
    pub async fn remove(&self, items: Vec<RemoveItem>) -> Result<Vec<Result<(), WireError>>, WireError> {
        self.remove_sent(items).await.map(|(results, _)| results)
    }

    /// As [`Client::remove`]; also says whether the batch was sent twice (then an item the first
    /// send removed answers `NotFound`).
    pub(crate) async fn remove_sent(
        &self,
        items: Vec<RemoveItem>,
    ) -> Result<(Vec<Result<(), WireError>>, bool), WireError> {
        if items.len() > homefs_shared::MAX_BATCH_FILES {
            return Err(WireError::new(ErrorCode::TooBig, "too many items for one remove"));
        }
        if items.is_empty() {
            return Ok((Vec::new(), false));
        }
        if !self.has_remove() {
            return Err(WireError::new(ErrorCode::NotSupported, "the server does not take Remove batches"));
        }
        let n = items.len();
        let request = Request::Remove { items };
        let mut again = false;
        let answer = if self.inner.removes.load(Ordering::Relaxed) == BATCH_UNKNOWN {
            // An older server closes the connection on a Remove it cannot decode: only
            // a Remove written and then lost counts, twice in a row, not a connection that never
            // came back in time (the server down).
            match self.exec_written(request.clone()).await {
                Err((_, true)) => {
                    again = true;
                    match self.exec_written(request).await {
                        Err((e, true)) => {
                            tracing::info!(
                                "the server closed the connection on a Remove twice: single unlinks from now on"
                            );
                            self.inner.removes.store(BATCH_NO, Ordering::Relaxed);
                            Err(e)
                        }
                        other => other.map_err(|(e, _)| e),
                    }
                }
                other => other.map_err(|(e, _)| e),
            }
        } else {
            self.exec(request, Bytes::new()).await
        };
        match answer {
            Ok((Response::Removed { results }, _, _)) if results.len() == n => {
                self.inner.removes.store(BATCH_YES, Ordering::Relaxed);
                Ok((results, again))
            }
            Ok(_) => Err(unexpected("Remove")),
            Err(e) => {
                if matches!(e.code, ErrorCode::Protocol | ErrorCode::NoSys | ErrorCode::NotSupported) {
                    tracing::info!(error = %e, "the server refused a Remove: single unlinks from now on");
                    self.inner.removes.store(BATCH_NO, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}

/// Closes a server handle no one needs, without making anyone wait for it.
fn close_in_background(conn: &Arc<Conn>, server: Fh) {
    let conn = conn.clone();
    tokio::spawn(async move {
        let _ = conn.request(Request::Close { fh: server }, Bytes::new()).await;
    });
}
