//! `impl fuser::Filesystem`: thin adapters only. Each callback copies its arguments, clones the
//! `Arc<Remote>`, polls the op's future once on the FUSE thread and, if it has to wait, spawns it
//! as a task on the one tokio runtime that owns the `Reply`, and returns; the work is in `ops.rs`.
//! No callback blocks a FUSE thread on the network.

use bytes::Bytes;
use fuser::{
    BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use homefs_shared::{SetAttr, StatFs};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

use super::attr::{file_type, set_time, BLOCK_SIZE};
use super::inodes::is_provisional;
use super::listed::Listed;
use super::ops::{lock_spec, Entry, Remote};

/// Reads and writes of 1 MiB (`max_write`, and readahead as far as the kernel allows).
pub const MAX_IO_BYTES: u32 = 1 << 20;
/// Requests the kernel may queue in the background (readahead, async reads); matched to the
/// client's in-flight cap so the kernel, not our memory, holds the excess.
pub const MAX_BACKGROUND: u16 = 64;

/// The FUSE side of one mount.
pub struct HomeFs {
    remote: Arc<Remote>,
    rt: Handle,
    /// FUSE requests by kind, for the profile logged at unmount.
    ops: Mutex<HashMap<&'static str, u64>>,
    /// Requests handed to the runtime (a hop each); the rest were answered on the FUSE thread.
    spawned: AtomicU64,
}

impl HomeFs {
    pub fn new(remote: Arc<Remote>, rt: Handle) -> HomeFs {
        HomeFs { remote, rt, ops: Mutex::new(HashMap::new()), spawned: AtomicU64::new(0) }
    }

    fn count(&self, op: &'static str) {
        *self.ops.lock().unwrap_or_else(|p| p.into_inner()).entry(op).or_default() += 1;
    }

    /// The FUSE requests served so far, by kind, most frequent first.
    pub fn op_counts(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.ops.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, n)| (*k, *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }

    fn ttl(&self) -> Duration {
        self.remote.cache.ttl()
    }

    /// Runs `f` with the shared state; the future owns the reply. It is polled once here, on
    /// the FUSE thread (inside the runtime's context, never waiting): what completes without
    /// waiting (a write queued behind, a no-op chown, a stat the cache answers once a queued
    /// write settled) is answered with no hop, and a request's frame is sent from here. Only
    /// what has to wait (an answer from the server, room in a queue) becomes a task on the
    /// runtime, which polls it again at once, so a wake-up missed by this first poll is not lost.
    fn spawn<F, Fut>(&self, op: &'static str, f: F)
    where
        F: FnOnce(Arc<Remote>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        tracing::debug!(op, "request");
        self.count(op);
        let mut task = Box::pin(f(self.remote.clone()));
        let polled = {
            let _runtime = self.rt.enter();
            let mut cx = Context::from_waker(Waker::noop());
            // As a task would: a panic fails this request (its reply, dropped, answers EIO), not the thread.
            std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(&mut cx)))
        };
        match polled {
            Ok(Poll::Ready(())) => {}
            Ok(Poll::Pending) => {
                self.spawned.fetch_add(1, Ordering::Relaxed);
                self.rt.spawn(task);
            }
            Err(_) => tracing::error!(op, "request handler panicked"),
        }
    }
}

impl Drop for HomeFs {
    /// At unmount: the profile of the mount's life, FUSE requests and the round trips they cost.
    fn drop(&mut self) {
        let show = |v: Vec<(&str, u64)>| v.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ");
        let spawned = self.spawned.load(Ordering::Relaxed);
        tracing::info!(ops = %show(self.op_counts()), spawned, "FUSE requests served (spawned: handed to the runtime)");
        tracing::info!(hits = %self.remote.hits.show(), "answered from the cache");
        tracing::info!(requests = %show(self.remote.client.request_counts()), "requests sent to the server");
    }
}

fn name_of(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

fn reply_entry(reply: ReplyEntry, ttl: Duration, r: Result<Entry, Errno>) {
    match r {
        Ok((_, attr)) => reply.entry(&ttl, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_lookup(reply: ReplyEntry, ttl: Duration, negative_ttl: Duration, r: Result<Option<Entry>, Errno>) {
    match r {
        Ok(Some((_, attr))) => reply.entry(&ttl, &attr, Generation(0)),
        // The kernel keeps absences only briefly: a notice cannot name every one it holds
        // (after a reconnect). Ours answer its next lookup without a round trip.
        Ok(None) if !negative_ttl.is_zero() => reply.entry(&negative_ttl, &negative_attr(), Generation(0)),
        Ok(None) => reply.error(Errno::ENOENT),
        Err(e) => reply.error(e),
    }
}

/// As [`reply_entry`], after a request that may have moved the usage figures (`usage.rs`): they
/// are stale before the caller hears back.
fn reply_entry_moved(r: &Remote, reply: ReplyEntry, ttl: Duration, result: Result<Entry, Errno>) {
    r.usage.changed();
    reply_entry(reply, ttl, result)
}

/// As [`reply_empty`], after a request that may have moved the usage figures.
fn reply_empty_moved(r: &Remote, reply: ReplyEmpty, result: Result<(), Errno>) {
    r.usage.changed();
    reply_empty(reply, result)
}

/// `statfs`'s reply. The fragment size is the largest of 4096, 512 and 1 that divides the quota,
/// so `df -B1` shows it exactly.
fn reply_statfs(reply: ReplyStatfs, s: &StatFs) {
    let frsize = [4096u64, 512, 1].into_iter().find(|f| s.total_bytes % f == 0).unwrap_or(1);
    let blocks = s.total_bytes / frsize;
    let bfree = s.total_bytes.saturating_sub(s.used_bytes) / frsize;
    let bavail = (s.free_bytes / frsize).min(bfree);
    let files = 1 << 24;
    let bsize = if s.block_size == 0 { BLOCK_SIZE } else { s.block_size };
    reply.statfs(blocks, bfree, bavail, files, files, bsize, s.max_name, frsize as u32);
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// A negative entry: inode 0 tells the kernel to cache the absence for `ttl`.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

impl Filesystem for HomeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each is best effort: an older kernel without one still mounts, only slower.
        let _ = config.set_max_write(MAX_IO_BYTES);
        if let Err(max) = config.set_max_readahead(MAX_IO_BYTES) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        // No FUSE_WRITEBACK_CACHE: with it the kernel acknowledges writes before they reach
        // the server, so a quota error could surface late or not at all, and close-to-open
        // would depend on when the kernel flushes. Writes go through, 1 MiB at a time.
        for flag in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        Ok(())
    }

    /// The session ended (unmounted): files created behind are stored and unlinks answered
    /// behind are sent before the process goes (bounded by [`super::creates::DRAIN`] and
    /// [`super::unlinks::WAIT_FOR_UNLINKS`]). Runs on the thread that ran the session, outside
    /// the runtime.
    fn destroy(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Not expected (the session runs on its own threads); blocking here would panic.
            return tracing::warn!("destroy inside the runtime: unlinks answered behind not awaited");
        }
        let remote = self.remote.clone();
        self.rt.block_on(async move {
            remote.drain_creates().await;
            remote.wait_for_all_unlinks().await
        });
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (name, ttl, negative_ttl) = (name_of(name), self.ttl(), self.remote.cache.negative_ttl());
        // From the cache on this thread (`rm -rf`, `find` after the kernel forgot): no hop.
        if let Some(answer) = self.remote.lookup_cached(parent.0, &name) {
            self.count("lookup");
            return reply_lookup(reply, ttl, negative_ttl, Ok(answer));
        }
        self.spawn("lookup", move |r| async move {
            reply_lookup(reply, ttl, negative_ttl, r.lookup(parent.0, &name).await)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.count("forget");
        self.remote.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl();
        // Fresh in the cache and no write queued (`stat` of a directory between creates): no hop.
        if let Some(attr) = self.remote.getattr_cached(ino.0) {
            self.count("getattr");
            return reply.attr(&ttl, &attr);
        }
        self.spawn("getattr", move |r| async move {
            r.writes.settle(ino.0).await;
            match r.getattr(ino.0).await {
                Ok(attr) => reply.attr(&ttl, &attr),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set =
            SetAttr { mode: mode.map(|m| m & 0o7777), size, atime: atime.map(set_time), mtime: mtime.map(set_time) };
        let ttl = self.ttl();
        // A file created behind and still pending: kept in its pending state (creates.rs).
        if is_provisional(ino.0) || fh.is_some_and(|f| is_provisional(f.0)) {
            if let Some(answer) = self.remote.setattr_created_now(ino.0, set, uid, gid) {
                self.count("setattr");
                return match answer {
                    Ok(attr) => reply.attr(&ttl, &attr),
                    Err(e) => reply.error(e),
                };
            }
            return self.spawn("setattr", move |r| async move {
                r.writes.settle(ino.0).await;
                let result = r.setattr_created(ino.0, set, fh.map(|f| f.0), uid, gid).await;
                if set.size.is_some() {
                    r.usage.changed();
                }
                match result {
                    Ok(attr) => reply.attr(&ttl, &attr),
                    Err(e) => reply.error(e),
                }
            });
        }
        // A no-op for the server (`tar x`'s `fchown` to ourselves, a chmod to the same mode): no hop.
        if let Some(answer) = self.remote.setattr_cached(ino.0, set, uid, gid) {
            self.count("setattr");
            return match answer {
                Ok(attr) => reply.attr(&ttl, &attr),
                Err(e) => reply.error(e),
            };
        }
        self.spawn("setattr", move |r| async move {
            r.writes.settle(ino.0).await;
            let result = r.setattr(ino.0, set, fh.map(|f| f.0), uid, gid).await;
            if set.size.is_some() {
                r.usage.changed();
            }
            match result {
                Ok(attr) => reply.attr(&ttl, &attr),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", move |r| async move {
            match r.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl) = (name_of(name), self.ttl());
        self.spawn("mknod", move |r| async move {
            let made = r.mknod(parent.0, &name, mode).await;
            reply_entry_moved(&r, reply, ttl, made)
        });
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let (name, ttl) = (name_of(name), self.ttl());
        self.spawn("mkdir", move |r| async move {
            let made = r.mkdir(parent.0, &name, mode).await;
            reply_entry_moved(&r, reply, ttl, made)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_of(name);
        // Answered behind on this thread when nothing needs waiting for (unlinks.rs).
        if self.remote.try_unlink_behind(&self.rt, parent.0, &name) {
            self.count("unlink");
            // An ask from now on waits for it (usage.rs).
            return reply_empty_moved(&self.remote, reply, Ok(()));
        }
        self.spawn("unlink", move |r| async move {
            let unlinked = r.unlink(parent.0, &name).await;
            reply_empty_moved(&r, reply, unlinked)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_of(name);
        self.spawn("rmdir", move |r| async move {
            let removed = r.rmdir(parent.0, &name).await;
            reply_empty_moved(&r, reply, removed)
        });
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, target, ttl) = (name_of(link_name), target.as_os_str().as_bytes().to_vec(), self.ttl());
        self.spawn("symlink", move |r| async move {
            let made = r.symlink(parent.0, &name, &target).await;
            reply_entry_moved(&r, reply, ttl, made)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname, flags) = (name_of(name), name_of(newname), flags.bits());
        self.spawn("rename", move |r| async move {
            let renamed = r.rename(parent.0, &name, newparent.0, &newname, flags).await;
            reply_empty_moved(&r, reply, renamed)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (newname, ttl) = (name_of(newname), self.ttl());
        self.spawn("link", move |r| async move {
            let made = r.link(ino.0, newparent.0, &newname).await;
            reply_entry_moved(&r, reply, ttl, made)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("open", move |r| async move {
            r.writes.settle(ino.0).await;
            let opened = r.open(ino.0, flags.0).await;
            if flags.0 & libc::O_TRUNC != 0 {
                r.usage.changed();
            }
            match opened {
                Ok((fh, open_flags)) => {
                    r.handles.file_opened(ino.0);
                    reply.opened(FileHandle(fh), open_flags)
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if is_provisional(fh.0) {
            return self.spawn("read", move |r| async move {
                match r.read_created(ino.0, fh.0, offset, size).await {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                }
            });
        }
        // Small reads on this thread, one hop less each way (reads.rs says when); the rest below.
        let Some(reply) = super::reads::inline(&self.remote, &self.rt, ino.0, fh.0, offset, size, reply) else {
            self.count("read");
            return;
        };
        self.spawn("read", move |r| async move {
            r.writes.settle(ino.0).await;
            match r.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The one copy on the way out: the kernel's buffer is borrowed for this call only.
        let data = Bytes::copy_from_slice(data);
        if is_provisional(fh.0) {
            // Into the pending file's buffer while it fits (creates.rs).
            return self.spawn("write", move |r| async move {
                let written = r.write_created(ino.0, fh.0, offset, data, flags.0).await;
                // Past the buffer, the file is stored and written through (queued on `ino`).
                r.usage.wrote(ino.0);
                match written {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(e),
                }
            });
        }
        // Appends (the server picks the offset: order matters) and O_SYNC/O_DSYNC writes (the
        // caller wants them done on return) go through at once, after any queued ones.
        let in_order = flags.0 & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC) != 0;
        self.spawn("write", move |r| async move {
            let written = r.clone().write_behind(ino.0, fh.0, offset, data, in_order).await;
            // Queued or done: the next ask of the usage figures settles it first (usage.rs).
            r.usage.wrote(ino.0);
            match written {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        if is_provisional(fh.0) {
            // The first close of a file created behind stores it; its error is close's.
            let pid = req.pid();
            return self.spawn("flush", move |r| async move {
                reply_empty(reply, r.flush_created(ino.0, fh.0, lock_owner.0, pid).await)
            });
        }
        let writes = self.remote.writes.pending(ino.0) || self.remote.writes.has_error(fh.0);
        let unlock = self.remote.flush_needs_unlock(fh.0, lock_owner.0);
        if !writes && !unlock {
            self.count("flush (no round trip)");
            return reply.ok();
        }
        // Queued writes are answered first: their error is close's to report.
        self.spawn("flush", move |r| async move {
            r.writes.settle(ino.0).await;
            let written = r.write_error(fh.0);
            let unlocked = if unlock { r.flush_unlock(fh.0, lock_owner.0).await } else { Ok(()) };
            reply_empty(reply, written.and(unlocked));
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // A flock owner (`FUSE_RELEASE_FLOCK_UNLOCK`) is among the owners recorded for the
        // handle, so `release` unlocks it with the rest.
        let _ = lock_owner;
        self.remote.handles.file_released(ino.0);
        // The last close of a file unlinked while open frees its space on the server: the usage
        // figures are stale from now, and again once the server closed it (usage.rs).
        let frees = self.remote.inodes.is_unlinked(ino.0);
        if frees {
            self.remote.usage.changed();
        }
        if is_provisional(fh.0) {
            return self.spawn("release", move |r| async move {
                r.release_created(ino.0, fh.0).await;
                if frees {
                    r.usage.changed();
                }
                reply.ok()
            });
        }
        let owners = self.remote.release_owners(fh.0);
        if owners.is_empty() {
            reply.ok();
            self.spawn("release (background)", move |r| async move {
                r.writes.settle(ino.0).await;
                if let Err(e) = r.write_error(fh.0) {
                    tracing::warn!(fh = fh.0, error = ?e, "a write failed after the file's last flush");
                }
                r.close_quietly(fh.0).await;
                if frees {
                    r.usage.changed();
                }
            });
            return;
        }
        self.spawn("release", move |r| async move {
            r.writes.settle(ino.0).await;
            let released = r.release(fh.0, owners).await;
            if frees {
                r.usage.changed();
            }
            reply_empty(reply, released)
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.spawn("fsync", move |r| async move {
            let fh = match r.real_fh(fh.0).await {
                Ok(fh) => fh,
                Err(e) => return reply.error(e),
            };
            r.writes.settle(ino.0).await;
            let written = r.write_error(fh);
            reply_empty(reply, written.and(r.fsync(fh, datasync).await))
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel keeps the listings it reads (handles.rs), unless nothing may be cached.
        let cache_dir = !self.ttl().is_zero();
        self.spawn("opendir", move |r| async move {
            match r.opendir(ino.0).await {
                Ok((fh, Some(keep))) if cache_dir => {
                    let flags = if keep {
                        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::FOPEN_CACHE_DIR
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Ok((fh, _)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        // Served from the snapshot taken at opendir: no network, so answered on this thread.
        self.count("readdir");
        let Some(dir) = self.remote.handles.dir(fh.0) else { return reply.error(Errno::EBADF) };
        // The kernel may keep what it is given here (handles.rs).
        self.remote.handles.serving_dir(&dir);
        let dots = [(dir.ino, FileType::Directory, &b"."[..]), (dir.parent_ino, FileType::Directory, &b".."[..])];
        let all = dots
            .into_iter()
            .chain(dir.entries.iter().zip(&dir.inos).map(|(e, ino)| (*ino, file_type(e.attr.kind), &e.name[..])));
        for (i, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        // From the snapshot: every entry carries its attributes, so `ls -l` needs no lookups.
        self.count("readdirplus");
        let Some(dir) = self.remote.handles.dir(fh.0) else { return reply.error(Errno::EBADF) };
        let Some(dir_path) = self.remote.inodes.path(ino.0) else { return reply.error(Errno::ESTALE) };
        // The kernel may keep what it is given here (handles.rs).
        self.remote.handles.serving_dir(&dir);
        let (ttl, owner) = (self.ttl(), self.remote.owner);
        let dir_attr = self.remote.inodes.last_attr(dir.ino);
        let mut index = offset as usize;
        // `.` and `..`: listed, never linked by the kernel, so they take no lookup.
        while index < 2 {
            let (dot_ino, name) = if index == 0 { (dir.ino, ".") } else { (dir.parent_ino, "..") };
            let attr = match dir_attr {
                Some(a) => owner.file_attr(dot_ino, &a),
                None => FileAttr { ino: INodeNo(dot_ino), kind: FileType::Directory, perm: 0o755, ..negative_attr() },
            };
            if reply.add(INodeNo(dot_ino), index as u64 + 1, name, &ttl, &attr, Generation(0)) {
                return reply.ok();
            }
            index += 1;
        }
        // Changed since the snapshot: each entry as it is now (listed.rs).
        let changed = self.remote.cache.changed_since(&dir_path, dir.generation);
        for (i, e) in dir.entries.iter().enumerate().skip(index - 2) {
            let Ok(path) = dir_path.join(&e.name) else { continue };
            let (now, entry_ttl) = match changed.then(|| self.remote.listed_now(&path, &e.attr)) {
                None => (Some(e.attr), ttl),
                Some(Listed::Now(a)) => (Some(a), ttl),
                Some(Listed::Unsure) => (Some(e.attr), Duration::ZERO),
                Some(Listed::Gone) => (None, ttl),
            };
            let ino = now.map_or(0, |a| self.remote.inodes.fuse_ino(a.ino));
            if dir.inos.get(i) != Some(&ino) {
                // Numbered otherwise since the snapshot (a file created behind was stored, a name
                // gone or replaced): the listing the kernel keeps is not the snapshot's.
                self.remote.handles.forget_kernel_listing(dir.ino);
            }
            // Inode 0: listed, with no dentry (listed.rs).
            let attr = match now {
                Some(a) => owner.file_attr(ino, &a),
                None => FileAttr { ino: INodeNo(0), kind: file_type(e.attr.kind), ..negative_attr() },
            };
            if reply.add(INodeNo(ino), i as u64 + 3, OsStr::from_bytes(&e.name), &entry_ttl, &attr, Generation(0)) {
                break;
            }
            // Added with a dentry: the kernel counts this as a lookup of the entry.
            if let Some(a) = now {
                self.remote.inodes.remember(&path, &a);
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.count("releasedir");
        self.remote.handles.close_dir(fh.0);
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No ioctl applies to a remote file. `open()` in Python, `isatty` and friends ask
        // `TCGETS` of every file they open: answered here, at once and without a log line.
        self.count("ioctl");
        reply.error(Errno::ENOTTY);
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes are made by the server's syscalls as they come; only unlinks
        // answered behind and files created behind may still be on their way: the files
        // pending in it (or below) are stored first.
        let Some(dir) = self.remote.inodes.path(ino.0) else { return reply.ok() };
        if !self.remote.cache.unlinks_pending(|d, _| *d == dir) && !self.remote.creates.any_pending() {
            return reply.ok();
        }
        self.spawn("fsyncdir", move |r| async move {
            let stored = r.materialize_within(&dir).await;
            r.wait_for_unlinks_in(&dir).await;
            reply_empty(reply, stored)
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Someone watches usage: from now on, changes are refreshed behind (usage.rs).
        self.remote.usage.watch(&self.remote, &self.rt);
        // Fresh figures (nothing changed since they were asked; `find`'s fstatfs): no hop.
        if let Some(s) = self.remote.usage_cached() {
            self.count("statfs");
            return reply_statfs(reply, &s);
        }
        self.spawn("statfs", move |r| async move {
            match r.statfs().await {
                Ok(s) => reply_statfs(reply, &s),
                Err(e) => reply.error(e),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, ttl) = (name_of(name), self.ttl());
        // Answered at once when the name is known absent; stored at the first close (creates.rs).
        if let Some(((_, attr), fh)) = self.remote.try_create_behind(parent.0, &name, mode, flags) {
            self.count("create");
            return reply.created(&ttl, &attr, Generation(0), FileHandle(fh), FopenFlags::empty());
        }
        self.spawn("create", move |r| async move {
            let created = r.create(parent.0, &name, mode, flags).await;
            r.usage.changed();
            match created {
                Ok(((ino, attr), fh)) => {
                    r.handles.file_opened(ino);
                    reply.created(&ttl, &attr, Generation(0), FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let spec = match lock_spec(typ, start, end, lock_owner.0, pid) {
            Ok(s) => s,
            Err(e) => return reply.error(e),
        };
        self.spawn("getlk", move |r| async move {
            let fh = match r.real_fh(fh.0).await {
                Ok(fh) => fh,
                Err(e) => return reply.error(e),
            };
            r.writes.settle(ino.0).await;
            match r.getlk(fh, spec).await {
                Ok((start, end, typ, pid)) => reply.locked(start, end, typ, pid),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let spec = match lock_spec(typ, start, end, lock_owner.0, pid) {
            Ok(s) => s,
            Err(e) => return reply.error(e),
        };
        self.spawn("setlk", move |r| async move {
            let fh = match r.real_fh(fh.0).await {
                Ok(fh) => fh,
                Err(e) => return reply.error(e),
            };
            // Another mount that takes the lock next must find these writes applied.
            r.writes.settle(ino.0).await;
            reply_empty(reply, r.setlk(ino.0, fh, spec, sleep).await)
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.spawn("copy_file_range", move |r| async move {
            let (fh_in, fh_out) = match (r.real_fh(fh_in.0).await, r.real_fh(fh_out.0).await) {
                (Ok(i), Ok(o)) => (i, o),
                (Err(e), _) | (_, Err(e)) => return reply.error(e),
            };
            r.writes.settle(ino_in.0).await;
            r.writes.settle(ino_out.0).await;
            let copied = r.copy_range(fh_in, offset_in, ino_out.0, fh_out, offset_out, len).await;
            r.usage.changed();
            match copied {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::inodes::ROOT_INO;

    #[test]
    fn root_is_inode_one() {
        assert_eq!(ROOT_INO, INodeNo::ROOT.0);
    }
}
