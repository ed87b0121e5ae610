//! What a logged-in client does: one function per request kind, dispatched from
//! [`AuthedSession::handle`]. Filesystem syscalls run on the blocking pool through the jail, except
//! short directory operations, which run inline when a slot is free (`inline.rs`).
//!
//! OWNED BY: the fsd-ops work (home/, ops/). The session layer uses only what is declared here.

use bytes::Bytes;
use homefs_shared::{ErrorCode, Fh, Request, Response, WireError, WirePath};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::home::{Jail, UserHome};
use inline::run_short;

pub mod checksum;
pub mod copy;
pub mod dir;
pub mod error;
pub mod file;
pub mod handles;
pub mod inline;
pub mod link;
pub mod lock;
pub mod meta;
pub mod remove;
pub mod sizing;
pub mod whole;

pub use error::OpError;
pub use lock::LockTable;

use handles::Handles;

/// A session after login: cannot exist without a user. Holds the session's open files.
pub struct AuthedSession {
    /// The user's home and quota, shared with the user's other sessions.
    home: Arc<UserHome>,
    /// The server-wide lock table.
    locks: Arc<LockTable>,
    /// Unique per connection: the scope of this session's lock owners and handles.
    id: u64,
    /// This session's open files.
    handles: Arc<Handles>,
}

impl AuthedSession {
    /// A session of `home`'s user. `locks` is the server-wide lock table, so that two sessions of
    /// one user see each other's locks; `id` is unique per connection (the lock owner's scope).
    pub fn new(home: Arc<UserHome>, locks: Arc<LockTable>, id: u64) -> AuthedSession {
        AuthedSession { home, locks, id, handles: Arc::new(Handles::default()) }
    }

    /// The user's name.
    pub fn user(&self) -> &str {
        &self.home.user
    }

    /// The user's home (jail and quota).
    pub fn home(&self) -> &Arc<UserHome> {
        &self.home
    }

    /// Answers a small `Read` at once, on the caller's task, when its bytes are in the page cache
    /// (no hop to the blocking pool); `None` when it must go through [`AuthedSession::handle`]
    /// (not cached, a large read, an unknown handle: `handle` gives the proper answer).
    pub fn read_cached(&self, fh: Fh, offset: u64, len: u32) -> Option<(Response, Bytes)> {
        let h = self.handles.get(fh).ok()?;
        let (bytes, size) = file::read_cached(&h, offset, len)?;
        Some((Response::Data { size }, bytes))
    }

    /// Answers a `Stat` at once, on the caller's task, when the whole lookup is in the kernel's
    /// cache; `None` when it must go through [`AuthedSession::handle`].
    pub fn stat_cached(&self, path: &WirePath) -> Option<Response> {
        meta::stat_cached(&self.home.jail, path).map(Response::Attr)
    }

    /// Unique per connection: the session's id in lock owners and change notices.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many files this session holds open.
    pub fn open_files(&self) -> usize {
        self.handles.len()
    }

    /// Answers one file request (not Hello/Login/Resume, which the session layer handles).
    /// Returns the response and the data that follows it (non-empty only for `Read`).
    /// Safe to call concurrently for many requests of one session.
    ///
    /// # Errors
    /// A [`WireError`] whose code is the errno the client should see.
    pub async fn handle(&self, request: Request, data: Bytes) -> Result<(Response, Bytes), WireError> {
        tracing::debug!(session = self.id, ?request, data = data.len(), "request");
        // What the request changes, for the user's other subscribed sessions: decided before the
        // request is consumed, published once it succeeded; nothing is built when nobody listens.
        let changed = if self.home.notices.is_watched() { self.changed_paths(&request) } else { Vec::new() };
        let result = self.dispatch(request, data).await;
        if result.is_ok() {
            self.home.notices.publish(self.id, &changed);
        }
        if let Err(e) = &result {
            self.log_failure(e);
        }
        result.map_err(WireError::from)
    }

    /// Logs a failed request: trouble on the server's side (the disk, the file system) is worth
    /// an operator's look; the rest (ENOENT, EEXIST, EDQUOT, ...) is the client's business.
    pub(crate) fn log_failure(&self, e: &OpError) {
        match e.code() {
            ErrorCode::Io | ErrorCode::NoSpace | ErrorCode::ReadOnly | ErrorCode::Stale => {
                tracing::warn!(user = self.user(), code = ?e.code(), error = %e, "request failed");
            }
            code => tracing::debug!(session = self.id, ?code, error = %e, "request failed"),
        }
    }

    /// The paths `request` changes when it succeeds (PROTOCOL.md, "Change notices"): entries made,
    /// removed or renamed, files created, truncated or with attributes set, and the path of a
    /// handle whose content is written (once per [`handles::WRITE_NOTICE_INTERVAL`] of a burst,
    /// and at its Fsync or Close).
    fn changed_paths(&self, request: &Request) -> Vec<WirePath> {
        let handle_path = |fh: Fh, due: &dyn Fn(&handles::Handle) -> bool| {
            self.handles.get(fh).ok().filter(|h| due(h)).map(|h| h.path.clone()).into_iter().collect()
        };
        let burst = |h: &handles::Handle| h.notice.is_due(Instant::now());
        let dirty = |h: &handles::Handle| h.notice.take_dirty();
        match request {
            Request::Mkdir { path, .. }
            | Request::Rmdir { path }
            | Request::Unlink { path }
            | Request::Symlink { path, .. }
            | Request::SetAttr { path, .. }
            | Request::PutFile { path, .. } => vec![path.clone()],
            Request::Open { path, flags, .. } if flags.create || flags.truncate => vec![path.clone()],
            Request::Rename { from, to, .. } => vec![from.clone(), to.clone()],
            Request::Link { to, .. } => vec![to.clone()],
            Request::Write { fh, .. } | Request::WriteAttr { fh, .. } => handle_path(*fh, &burst),
            Request::CopyRange { dst, .. } => handle_path(*dst, &burst),
            Request::PutFiles { files } => files.iter().map(|f| f.path.clone()).collect(),
            Request::Remove { items } => items.iter().map(|i| i.path.clone()).collect(),
            Request::Fsync { fh, .. } | Request::Close { fh } => handle_path(*fh, &dirty),
            _ => Vec::new(),
        }
    }

    async fn dispatch(&self, request: Request, data: Bytes) -> Result<(Response, Bytes), OpError> {
        let jail = &self.home.jail;
        let quota = Arc::clone(&self.home.quota);
        let answer = match request {
            Request::Hello { .. } | Request::Login { .. } | Request::Resume { .. } => {
                return Err(ErrorCode::Protocol.into());
            }
            Request::Ping => Response::Done,
            Request::Stat { path } => Response::Attr(run_short(jail, move |j| meta::stat(j, &path)).await?),
            Request::ReadDir { path, after, max_entries } => {
                let (entries, more) = jail.run(move |j| dir::read_dir(j, &path, after.as_deref(), max_entries)).await?;
                Response::Entries { entries, more }
            }
            Request::Mkdir { path, mode } => {
                Response::Attr(run_short(jail, move |j| dir::mkdir(j, &path, mode)).await?)
            }
            Request::Rmdir { path } => {
                run_short(jail, move |j| dir::rmdir(j, &path)).await?;
                Response::Done
            }
            Request::Unlink { path } => {
                inline::run_short_freeing(jail, move |j, place| link::unlink(j, &quota, &path, place)).await?;
                Response::Done
            }
            Request::Rename { from, to, flags } => {
                let rename = move |j: &Jail, place| link::rename(j, &quota, &from, &to, flags, place);
                inline::run_short_freeing(jail, rename).await?;
                Response::Done
            }
            Request::Symlink { target, path } => {
                Response::Attr(run_short(jail, move |j| link::symlink(j, &quota, &target, &path)).await?)
            }
            Request::ReadLink { path } => Response::Target(run_short(jail, move |j| link::read_link(j, &path)).await?),
            Request::Link { from, to } => {
                Response::Attr(run_short(jail, move |j| link::link(j, &quota, &from, &to)).await?)
            }
            Request::Open { path, flags, mode } => {
                if !self.handles.has_room() {
                    return Err(ErrorCode::TooManyFiles.into());
                }
                // A truncation may free a large file's blocks: that one waits on the pool.
                let open = move |j: &Jail| file::open(j, &quota, &path, flags, mode);
                let (handle, attr) = if flags.truncate { jail.run(open).await? } else { run_short(jail, open).await? };
                let fh = self.handles.insert(handle)?;
                Response::Opened { fh, attr }
            }
            Request::Read { fh, offset, len } => {
                let h = self.handles.get(fh)?;
                let (bytes, size) = jail.run(move |_| file::read(&h, offset, len)).await?;
                return Ok((Response::Data { size }, bytes));
            }
            Request::Write { fh, offset } => {
                let h = self.handles.get(fh)?;
                h.notice.written();
                let len = u32::try_from(data.len()).map_err(|_| ErrorCode::TooBig)?;
                let size = jail.run(move |_| file::write(&quota, &h, offset, &data)).await?;
                Response::Written { len, size }
            }
            Request::WriteAttr { fh, offset } => {
                let h = self.handles.get(fh)?;
                h.notice.written();
                let len = u32::try_from(data.len()).map_err(|_| ErrorCode::TooBig)?;
                let attr = jail.run(move |_| file::write_attr(&quota, &h, offset, &data)).await?;
                Response::WrittenAttr { len, attr }
            }
            Request::Close { fh } => {
                let h = self.handles.remove(fh).ok_or(ErrorCode::BadHandle)?;
                let file = h.file;
                // The last reference closes the fd; close(2) may block (e.g. on network storage,
                // or freeing a file unlinked while open): inline only within the slot's bound, and
                // a large unlinked file is freed on the pool.
                let large = rustix::fs::fstat(&h.fd).is_ok_and(|st| st.st_nlink == 0 && inline::frees_much(&st));
                let mut h = Some(h);
                let close = move |_: &Jail| {
                    drop(h.take());
                    Ok(())
                };
                let closed = if large { jail.run(close).await } else { run_short(jail, close).await };
                // Released once the file is closed (whatever the close answered): a waiter woken
                // earlier would be queued behind this close on this runtime thread (tokio runs a
                // task woken here next, here).
                self.locks.release_flock(file, self.id, fh.0);
                closed?;
                Response::Done
            }
            Request::SetAttr { path, fh, set } => {
                let h = fh.map(|fh| self.handles.get(fh)).transpose()?;
                // A size change (truncation) may free a large file's blocks: that one waits on the pool.
                let resize = set.size.is_some();
                let set_attr = move |j: &Jail| meta::set_attr(j, &quota, &path, h.as_deref(), &set);
                Response::Attr(if resize { jail.run(set_attr).await? } else { run_short(jail, set_attr).await? })
            }
            Request::Fsync { fh, datasync } => {
                let h = self.handles.get(fh)?;
                jail.run(move |_| file::fsync(&h, datasync)).await?;
                Response::Done
            }
            Request::StatFs => Response::StatFs(run_short(jail, move |j| meta::stat_fs(j, &quota)).await?),
            Request::CopyRange { src, src_offset, dst, dst_offset, len } => {
                let (src, dst) = (self.handles.get(src)?, self.handles.get(dst)?);
                dst.notice.written();
                let len = jail.run(move |_| copy::copy_range(&quota, &src, src_offset, &dst, dst_offset, len)).await?;
                Response::Copied { len }
            }
            Request::Checksum { path, start, end } => {
                jail.run(move |j| checksum::checksum(j, &path, start, end)).await?
            }
            Request::Lock { fh, lock, wait } => {
                let h = self.handles.get(fh)?;
                self.locks.lock(h.file, self.id, fh.0, lock, wait).await?;
                Response::Done
            }
            Request::TestLock { fh, lock } => {
                let h = self.handles.get(fh)?;
                Response::LockTest(self.locks.test(h.file, self.id, fh.0, &lock))
            }
            // Handled by the session layer (it owns the connection's notice stream).
            Request::Subscribe => return Err(ErrorCode::Protocol.into()),
            Request::PutFile { path, mode, mtime, exclusive } => {
                let small = data.len() <= inline::MAX_INLINE_PUT_BYTES
                    && (exclusive || !inline::removal_frees_much(jail, &path));
                let put = move |j: &Jail| whole::put_file(j, &quota, &path, mode, mtime, exclusive, &data);
                let (hash, attr) = if small { run_short(jail, put).await? } else { jail.run(put).await? };
                Response::Stored { hash, attr }
            }
            Request::GetFile { path, max_len } => {
                let (attr, hash, bytes) = jail.run(move |j| whole::get_file(j, &path, max_len)).await?;
                return Ok((Response::FileData { attr, hash }, bytes));
            }
            Request::SyncFs => {
                jail.run(whole::sync_fs).await?;
                Response::Done
            }
            Request::PutFiles { files } => {
                let results = jail.run(move |j| whole::put_files(j, &quota, &files, &data)).await?;
                Response::StoredFiles { results: whole::to_wire(results, |e| self.log_failure(e)) }
            }
            Request::GetFiles { paths, max_bytes } => {
                let (results, bytes) = jail.run(move |j| whole::get_files(j, &paths, max_bytes)).await?;
                return Ok((Response::FilesData { results: whole::to_wire(results, |e| self.log_failure(e)) }, bytes));
            }
            Request::Sync { paths } => {
                jail.run(move |j| whole::sync_paths(j, &paths)).await?;
                Response::Done
            }
            Request::Remove { items } => {
                let results = remove::remove(jail, &quota, items).await?;
                Response::Removed { results: whole::to_wire(results, |e| self.log_failure(e)) }
            }
        };
        Ok((answer, Bytes::new()))
    }

    /// Ends the session: releases its locks and closes its open files. Called once, by the
    /// session layer, after the connection is gone and in-flight requests have finished.
    pub async fn end(&self) {
        self.locks.release_session(self.id);
        let handles = Arc::clone(&self.handles);
        let closed = self
            .home
            .jail
            .run(move |_| {
                handles.clear();
                Ok::<_, io::Error>(())
            })
            .await;
        if let Err(e) = closed {
            tracing::error!(session = self.id, error = %e, "closing the session's files failed");
        }
    }
}
