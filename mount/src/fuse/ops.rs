//! What each FUSE request does against the server: resolve the inode to a path, answer from the
//! cache when it is fresh, else call the client, then keep the inode table and the cache up to
//! date. Every function returns `Result<_, Errno>`; `fs.rs` only turns that into a reply.
//!
//! Nothing here waits without a bound: every client call is bounded by the client's reconnect
//! timeout, and a blocking lock re-sends only while the process that asked for it is alive.

use bytes::Bytes;
use fuser::{Errno, FileAttr, FopenFlags, INodeNo, Notifier};
use homefs_shared::{
    Attr, DirEntry, ErrorCode, Fh, FileKind, LockKind, LockSpec, OpenFlags, RenameFlags, SetAttr, StatFs, Timestamp,
    WireError, WirePath, MAX_DATA_BYTES,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::applied::NoticesApplied;
use super::attr::Owner;
use super::cache::{AttrCache, Cached};
use super::creates::Creates;
use super::handles::{DirSnapshot, Handles};
use super::inodes::{InodeTable, ROOT_INO};
use super::prefetch::{Prefetch, LISTING_PAGE, READ_AHEAD_DIRS};
use super::usage::Usage;
use super::writes::WriteBehind;
use crate::client::Client;

/// The kernel's "to the end of the file" for a lock range (`OFFSET_MAX`).
const OFFSET_MAX: u64 = i64::MAX as u64;
/// The most one `copy_file_range` request copies: the kernel's reply holds a `u32`, and a
/// caller such as `cp` loops until all is copied.
const MAX_COPY_BYTES: u64 = 1 << 30;
/// A blocking lock whose wait the server answered sooner than this is re-sent only after this
/// long, so a server that does not wait cannot make us spin.
const LOCK_RETRY_PACE: Duration = Duration::from_millis(100);
/// How long a lock reply waits for the kernel to drop the file's cached pages.
const LOCK_INVALIDATE_TIMEOUT: Duration = Duration::from_secs(5);

pub type R<T> = Result<T, Errno>;

/// The errno for a server error (through the one table, `ErrorCode::errno`).
pub fn errno(e: &WireError) -> Errno {
    Errno::from_i32(e.code.errno())
}

fn code_errno(c: ErrorCode) -> Errno {
    Errno::from_i32(c.errno())
}

/// An entry for the kernel: FUSE inode and attributes.
pub type Entry = (u64, FileAttr);

/// The state behind every request of one mount.
pub struct Remote {
    pub client: Client,
    pub inodes: InodeTable,
    pub cache: AttrCache,
    pub handles: Handles,
    pub owner: Owner,
    pub read_only: bool,
    /// Set once the session exists; used to drop the kernel's cached attributes of a file that
    /// changed elsewhere (close-to-open).
    pub notifier: OnceLock<Notifier>,
    /// Requests answered from the cache, by kind (the profile logged at unmount).
    pub hits: Hits,
    /// Writes answered and still on their way (write-behind).
    pub writes: WriteBehind,
    /// Listings being fetched (read-ahead and lookups), see [`Prefetch`].
    pub prefetch: Prefetch,
    /// Files answered by create-behind (`creates.rs`).
    pub creates: Creates,
    /// How far change notices are applied (a lock grant waits for them: `applied.rs`).
    pub notices: NoticesApplied,
    /// The usage figures `statfs` answers from while nothing moved them (`usage.rs`).
    pub usage: Usage,
}

/// Counts of requests answered without a round trip.
#[derive(Debug, Default)]
pub struct Hits {
    pub lookup: AtomicU64,
    pub lookup_absent: AtomicU64,
    pub getattr: AtomicU64,
    pub readdir: AtomicU64,
    pub setattr: AtomicU64,
    /// Unlinks answered before the server had them (`unlinks.rs`).
    pub unlink_behind: AtomicU64,
    /// Creates answered before the server had them (`creates.rs`).
    pub create_behind: AtomicU64,
}

impl Hits {
    pub(super) fn add(n: &AtomicU64) {
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// `name=count` of each kind.
    pub fn show(&self) -> String {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        format!(
            "lookup={} lookup_absent={} getattr={} readdir={} setattr={} unlink_behind={} create_behind={}",
            get(&self.lookup),
            get(&self.lookup_absent),
            get(&self.getattr),
            get(&self.readdir),
            get(&self.setattr),
            get(&self.unlink_behind),
            get(&self.create_behind)
        )
    }
}

impl Remote {
    fn path(&self, ino: u64) -> R<WirePath> {
        self.inodes.path(ino).ok_or(Errno::ESTALE)
    }

    pub(super) fn child(&self, parent: u64, name: &[u8]) -> R<WirePath> {
        self.path(parent)?.join(name).map_err(|e| code_errno(e.code()))
    }

    /// The error for a request on a path the kernel believed in: `NotFound` means its dentry
    /// is stale (the file was removed or replaced through another mount within the TTL), so we
    /// answer `ESTALE`, on which the VFS walks the path again with `LOOKUP_REVAL`, a fresh
    /// lookup, and the caller sees the file as it is now.
    fn gone_or(&self, path: &WirePath, e: &WireError) -> Errno {
        if e.code == ErrorCode::NotFound {
            self.cache.invalidate(path);
            Errno::ESTALE
        } else {
            errno(e)
        }
    }

    /// A directory's entries changed through us: its own mtime, ctime and size did too.
    fn dir_changed(&self, dir: u64) {
        if let Some(p) = self.inodes.path(dir) {
            self.cache.invalidate_attr(&p);
        }
    }

    /// A file was added to or removed from `dir` through us (see [`AttrCache::touch_dir`]).
    pub(super) fn dir_touched(&self, dir: u64) {
        self.dir_touched_links(dir, 0);
    }

    /// As [`Remote::dir_touched`], for a subdirectory made (`links` = 1) or removed (-1).
    fn dir_touched_links(&self, dir: u64, links: i32) {
        if let Some(p) = self.inodes.path(dir) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.cache.touch_dir(&p, Timestamp { secs: now.as_secs() as i64, nanos: now.subsec_nanos() }, links);
        }
    }

    /// A request that adds `path` failed: whatever the cache believed of it may be wrong.
    fn add_failed<T>(&self, path: &WirePath, e: &WireError) -> R<T> {
        self.cache.invalidate(path);
        Err(errno(e))
    }

    pub(super) fn writable(&self) -> R<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// The kernel now knows `path`: one more lookup, cached attributes.
    fn entry(&self, path: &WirePath, attr: &Attr) -> Entry {
        self.cache.put(path, attr);
        self.known(path, attr)
    }

    /// As [`Remote::entry`], for attributes the cache already holds (or must not).
    pub(super) fn known(&self, path: &WirePath, attr: &Attr) -> Entry {
        let ino = self.inodes.remember(path, attr);
        (ino, self.owner.file_attr(ino, attr))
    }

    /// The FUSE inode of the server's file `server_ino` with writes queued, if any: its own, or
    /// the provisional inode of a file created behind still written through (`creates.rs`).
    pub(super) fn writes_pending_on(&self, server_ino: u64) -> Option<u64> {
        let own = self.inodes.fuse_ino(server_ino);
        if self.writes.pending(own) {
            return Some(own);
        }
        self.inodes.shadow_of(server_ino).filter(|p| self.writes.pending(*p))
    }

    /// `lookup`: `None` is a negative entry (the kernel caches the absence for one TTL).
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> R<Option<Entry>> {
        let dir = self.path(parent)?;
        let path = dir.join(name).map_err(|e| code_errno(e.code()))?;
        if let Some(entry) = self.created_entry(&path).await? {
            return Ok(Some(entry));
        }
        let mut attr = self.lookup_attr(&dir, &path).await?;
        // Writes still queued on the file would make its size look older than it is.
        if let Some(ino) = attr.and_then(|a| self.writes_pending_on(a.ino)) {
            self.writes.settle(ino).await;
            attr = self.lookup_attr(&dir, &path).await?;
        }
        Ok(attr.map(|a| self.known(&path, &a)))
    }

    /// A name not in the cache costs its directory's listing (one page at most, which answers
    /// the names that follow too), else a stat of the one name.
    async fn lookup_attr(&self, dir: &WirePath, path: &WirePath) -> R<Option<Attr>> {
        if let Some(answer) = self.cached_lookup(path) {
            return Ok(answer);
        }
        // The server must have this mount's unlinks in `dir` before it is asked about it.
        self.wait_for_unlinks_in(dir).await;
        // Without a cache (`cache_ttl=0`) a listing would not be kept: stat the one name.
        if !self.cache.ttl().is_zero() && !self.cache.is_complete_dir(dir) && !self.prefetch.is_big(dir) {
            if self.prefetch.claim(dir) {
                self.fetch_listing_page(dir).await;
                self.prefetch.release(dir);
            } else {
                self.prefetch.wait(dir).await;
            }
            if let Some(answer) = self.cached_lookup(path) {
                return Ok(answer);
            }
        }
        let generation = self.cache.generation();
        match self.client.stat(path).await {
            Ok(a) => {
                self.cache.put_fetched(path, &a, generation);
                Ok(Some(a))
            }
            Err(e) if e.code == ErrorCode::NotFound => {
                self.cache.put_absent(path, Some(generation));
                Ok(None)
            }
            Err(e) => Err(errno(&e)),
        }
    }

    /// `getattr`. A file unlinked while open answers from its last known attributes.
    pub async fn getattr(&self, ino: u64) -> R<FileAttr> {
        if let Some(attr) = self.created_attr(ino).await? {
            return Ok(attr);
        }
        let path = self.path(ino)?;
        if let Some(attr) = self.fresh_attr(ino, &path) {
            return Ok(attr);
        }
        let generation = self.cache.generation();
        match self.client.stat(&path).await {
            Ok(a) if ino == ROOT_INO || self.inodes.is(ino, a.ino) => {
                self.cache.put_fetched(&path, &a, generation);
                self.inodes.update_attr(ino, &a);
                Ok(self.owner.file_attr(ino, &a))
            }
            // The path now names another file (replaced elsewhere), or none: ours is gone.
            Ok(_) | Err(WireError { code: ErrorCode::NotFound, .. }) => match self.inodes.last_attr(ino) {
                Some(mut a) if self.inodes.is_unlinked(ino) => {
                    a.nlink = 0;
                    Ok(self.owner.file_attr(ino, &a))
                }
                // Removed or replaced elsewhere: the kernel's dentry is stale.
                _ => {
                    self.cache.invalidate(&path);
                    Err(Errno::ESTALE)
                }
            },
            Err(e) => Err(errno(&e)),
        }
    }

    /// `setattr`: mode, size and times (ownership cannot change: every file is the user's).
    /// `ino`'s attributes from the cache, when fresh and still naming `ino`.
    fn fresh_attr(&self, ino: u64, path: &WirePath) -> Option<FileAttr> {
        match self.cache.get(path)? {
            Cached::Present(a) if ino == ROOT_INO || self.inodes.is(ino, a.ino) => {
                Hits::add(&self.hits.getattr);
                Some(self.owner.file_attr(ino, &a))
            }
            _ => None,
        }
    }

    /// `getattr` answered on the caller's (FUSE) thread, without a hop to the runtime: `None`
    /// when a write on `ino` is queued (its answer comes first: [`Remote::getattr`] settles it)
    /// or the cache has no fresh attributes. A write's range is queued before its reply, so a
    /// `write` then `fstat` always takes the waiting way.
    pub fn getattr_cached(&self, ino: u64) -> Option<FileAttr> {
        if self.writes.pending(ino) {
            return None;
        }
        if let Some(pending) = self.created_attr_now(ino) {
            return pending;
        }
        self.fresh_attr(ino, &self.inodes.path(ino)?)
    }

    /// `setattr` answered on the caller's thread when it changes nothing the server keeps (the
    /// owner set to ours, `tar x`'s `fchown`; a mode set to what it is), as [`Remote::setattr`]
    /// would answer it; `None` for everything else, which takes the usual way.
    pub fn setattr_cached(&self, ino: u64, set: SetAttr, uid: Option<u32>, gid: Option<u32>) -> Option<R<FileAttr>> {
        if self.writes.pending(ino) {
            return None;
        }
        if uid.is_some_and(|u| u != self.owner.uid) || gid.is_some_and(|g| g != self.owner.gid) {
            return Some(Err(Errno::EPERM));
        }
        if set == SetAttr::default() {
            return self.getattr_cached(ino).map(Ok);
        }
        let SetAttr { mode: Some(mode), size: None, atime: None, mtime: None } = set else { return None };
        self.writable().ok()?;
        let path = self.inodes.path(ino)?;
        match self.cache.get(&path)? {
            Cached::Present(a)
                if a.perm & 0o7777 == mode & 0o7777 && (ino == ROOT_INO || self.inodes.is(ino, a.ino)) =>
            {
                Hits::add(&self.hits.setattr);
                Some(Ok(self.owner.file_attr(ino, &a)))
            }
            _ => None,
        }
    }

    pub async fn setattr(
        &self,
        ino: u64,
        set: SetAttr,
        fh: Option<u64>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> R<FileAttr> {
        if uid.is_some_and(|u| u != self.owner.uid) || gid.is_some_and(|g| g != self.owner.gid) {
            return Err(Errno::EPERM);
        }
        let path = self.path(ino)?;
        if set == SetAttr::default() {
            return self.getattr(ino).await;
        }
        self.writable()?;
        // A mode set to what it already is (`tar x` restores each file's mode right after
        // creating it with that mode) changes nothing but ctime: answered from fresh attributes.
        if let (SetAttr { mode: Some(mode), size: None, atime: None, mtime: None }, Some(Cached::Present(a))) =
            (set, self.cache.get(&path))
        {
            if a.perm & 0o7777 == mode & 0o7777 && (ino == ROOT_INO || self.inodes.is(ino, a.ino)) {
                Hits::add(&self.hits.setattr);
                return Ok(self.owner.file_attr(ino, &a));
            }
        }
        let a = self.client.setattr(&path, fh.map(Fh), set).await.map_err(|e| errno(&e))?;
        self.cache.put(&path, &a);
        self.inodes.update_attr(ino, &a);
        Ok(self.owner.file_attr(ino, &a))
    }

    pub async fn mkdir(&self, parent: u64, name: &[u8], mode: u32) -> R<Entry> {
        self.writable()?;
        let path = self.child(parent, name)?;
        self.wait_for_unlinks_within(&path).await;
        let result = self.client.mkdir(&path, mode & 0o7777).await;
        let a = match result {
            Ok(a) => a,
            Err(e) => {
                self.dir_changed(parent);
                return self.add_failed(&path, &e);
            }
        };
        self.dir_touched_links(parent, 1);
        let entry = self.entry(&path, &a);
        // Empty, and everything added to it through us is recorded: lookups of new names in it
        // (each create's) need no round trip for one TTL.
        self.cache.put_complete_dir(&path);
        Ok(entry)
    }

    /// `mknod`: regular files only (what `mkfifo` and device nodes would need, a home has no use for).
    pub async fn mknod(&self, parent: u64, name: &[u8], mode: u32) -> R<Entry> {
        self.writable()?;
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return Err(Errno::EPERM);
        }
        let path = self.child(parent, name)?;
        self.wait_for_unlinks_within(&path).await;
        let flags = OpenFlags { write: true, create: true, exclusive: true, ..OpenFlags::default() };
        let result = self.client.open(&path, flags, mode & 0o7777).await;
        self.dir_touched(parent);
        let (fh, a) = match result {
            Ok(opened) => opened,
            Err(e) => return self.add_failed(&path, &e),
        };
        self.client.close(fh).await.map_err(|e| errno(&e))?;
        Ok(self.entry(&path, &a))
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> R<()> {
        let path = self.child(parent, name)?;
        // Its files unlinked behind must be gone first (or go in the same request, before it),
        // or the server finds it not empty; its files created behind must be there (the server
        // then finds it not empty).
        self.materialize_within(&path).await?;
        // With its unlinks still queued in one request (unlinks.rs).
        if let Err(e) = self.rmdir_after_unlinks(&path).await {
            self.cache.invalidate_tree(&path);
            self.dir_changed(parent);
            return Err(errno(&e));
        }
        // The parent's attributes and listing stay (the next rmdir's permission check on it,
        // `rm -rf`, needs no round trip).
        // Its inode from the cache when known: no scan of the inode table (`rm -rf` of a tree).
        let known = match self.cache.get(&path) {
            Some(Cached::Present(a)) => Some(self.inodes.fuse_ino(a.ino)),
            _ => None,
        };
        self.cache.removed_dir(&path);
        self.dir_touched_links(parent, -1);
        if !known.is_some_and(|ino| self.inodes.unlinked_ino(ino, &path)) {
            self.inodes.unlinked(&path);
        }
        Ok(())
    }

    pub async fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], flags: u32) -> R<()> {
        let from = self.child(parent, name)?;
        let to = self.child(new_parent, new_name)?;
        let flags = RenameFlags {
            noreplace: flags & libc::RENAME_NOREPLACE != 0,
            exchange: flags & libc::RENAME_EXCHANGE != 0,
        };
        if flags.noreplace && flags.exchange {
            return Err(Errno::EINVAL);
        }
        // Files created behind move (or are replaced) on the server, so they must be there.
        self.materialize_within(&from).await?;
        self.keep_open_within(&to).await?;
        self.wait_for_unlinks_within(&from).await;
        self.wait_for_unlinks_within(&to).await;
        let result = self.client.rename(&from, &to, flags).await;
        let moved = self.cache.get(&from);
        self.cache.invalidate_tree(&from);
        self.cache.invalidate_tree(&to);
        self.dir_changed(parent);
        self.dir_changed(new_parent);
        result.map_err(|e| errno(&e))?;
        if flags.exchange {
            self.inodes.exchanged(&from, &to);
        } else {
            self.inodes.renamed(&from, &to);
            // A file keeps its attributes under the new name but ctime (an editor's or git's
            // save by rename: the kernel asks for them right after). Directories are asked again.
            if let Some(Cached::Present(mut a)) =
                moved.filter(|m| matches!(m, Cached::Present(a) if a.kind != FileKind::Dir))
            {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                a.ctime = a.ctime.max(Timestamp { secs: now.as_secs() as i64, nanos: now.subsec_nanos() });
                self.cache.put(&to, &a);
            }
        }
        Ok(())
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8]) -> R<Entry> {
        self.writable()?;
        let path = self.child(parent, name)?;
        self.wait_for_unlinks_within(&path).await;
        let result = self.client.symlink(target, &path).await;
        self.dir_touched(parent);
        let a = match result {
            Ok(a) => a,
            Err(e) => return self.add_failed(&path, &e),
        };
        Ok(self.entry(&path, &a))
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> R<Entry> {
        self.writable()?;
        self.materialize(ino).await?;
        let from = self.path(ino)?;
        let to = self.child(new_parent, new_name)?;
        self.wait_for_unlinks_within(&to).await;
        let result = self.client.link(&from, &to).await;
        self.dir_touched(new_parent);
        let a = match result {
            Ok(a) => a,
            Err(e) => return self.add_failed(&to, &e),
        };
        // The link count changed for every name of the file.
        self.cache.invalidate_attr(&from);
        Ok(self.entry(&to, &a))
    }

    pub async fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        let path = self.path(ino)?;
        self.client.readlink(&path).await.map_err(|e| errno(&e))
    }

    /// `open`: a fresh open on the server is also the close-to-open revalidation. When the file
    /// is as we last saw it the kernel keeps its page cache; when not, its pages are dropped
    /// (no `FOPEN_KEEP_CACHE`) and so are its cached attributes, so the new size is seen too.
    pub async fn open(&self, ino: u64, flags: i32) -> R<(u64, FopenFlags)> {
        let open_flags = open_flags(flags);
        if open_flags.write || open_flags.truncate {
            self.writable()?;
        }
        // A second open of a file created behind: the server must have it first.
        self.materialize(ino).await?;
        let path = self.path(ino)?;
        let (fh, a) = match self.client.open(&path, open_flags, 0).await {
            Ok(opened) => opened,
            Err(e) => return Err(self.gone_or(&path, &e)),
        };
        self.cache.put(&path, &a);
        let before = self.inodes.update_attr(ino, &a);
        let unchanged = before.is_some_and(|b| b.mtime == a.mtime && b.size == a.size && b.ino == a.ino);
        if unchanged {
            return Ok((fh.0, FopenFlags::FOPEN_KEEP_CACHE));
        }
        if let Some(n) = self.notifier.get() {
            // Attributes only (offset < 0): no page is touched, so this cannot wait on a page
            // lock held by a request we have yet to answer. ENOENT (the kernel dropped the
            // inode meanwhile) is fine.
            let _ = n.inval_inode(INodeNo(ino), -1, 0);
        }
        Ok((fh.0, FopenFlags::empty()))
    }

    pub async fn create(&self, parent: u64, name: &[u8], mode: u32, flags: i32) -> R<(Entry, u64)> {
        self.writable()?;
        let path = self.child(parent, name)?;
        self.wait_for_unlinks_within(&path).await;
        let mut open_flags = open_flags(flags);
        open_flags.create = true;
        let result = self.client.open(&path, open_flags, mode & 0o7777).await;
        self.dir_touched(parent);
        let (fh, a) = match result {
            Ok(opened) => opened,
            Err(e) => return self.add_failed(&path, &e),
        };
        Ok((self.entry(&path, &a), fh.0))
    }

    /// `write`, answered once queued (see `writes.rs`): the error of an earlier queued write on
    /// this handle comes first. `in_order` writes (appends, O_SYNC) and writes over
    /// [`MAX_DATA_BYTES`] are not queued: they wait for the queued ones, then go through.
    pub async fn write_behind(self: Arc<Self>, ino: u64, fh: u64, offset: u64, data: Bytes, in_order: bool) -> R<u32> {
        self.writable()?;
        if let Some(e) = self.writes.take_error(fh) {
            return Err(e);
        }
        if in_order || data.len() > MAX_DATA_BYTES as usize {
            self.writes.settle(ino).await;
            return self.write(ino, fh, offset, data).await;
        }
        let len = data.len() as u32;
        let ticket = self.writes.enqueue(ino, offset, offset.saturating_add(data.len() as u64)).await;
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.client.write_attr(Fh(fh), offset, data).await;
            // The cache is brought up to date before the ticket goes, so whoever settles sees it.
            // A file unlinked while open has no name: its path must not come back in the cache,
            // and `fstat` answers from the inode's attributes.
            let unlinked = me.inodes.is_unlinked(ino);
            match (&result, me.inodes.path(ino)) {
                (Ok(a), _) if unlinked && me.inodes.is(ino, a.ino) => {
                    me.inodes.update_attr(ino, &ticket.merge(a));
                }
                (Ok(a), Some(p)) if !unlinked && me.inodes.is(ino, a.ino) => me.cache.refresh(&p, &ticket.merge(a)),
                (_, Some(p)) if !unlinked => me.cache.invalidate_attr(&p),
                _ => {}
            }
            if let Err(e) = &result {
                me.writes.failed(fh, errno(e));
            }
            drop(ticket);
        });
        Ok(len)
    }

    /// The rest of a `flush` or `fsync` after [`WriteBehind::settle`]: the handle's write error.
    pub fn write_error(&self, fh: u64) -> R<()> {
        self.writes.take_error(fh).map_or(Ok(()), Err)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> R<Bytes> {
        let (data, _size) = self.client.read(Fh(fh), offset, size).await.map_err(|e| errno(&e))?;
        Ok(data)
    }

    pub async fn write(&self, ino: u64, fh: u64, offset: u64, data: Bytes) -> R<u32> {
        self.writable()?;
        let len = data.len() as u32;
        // The kernel asks for the attributes after each write: the answer carries them.
        let result = if data.len() <= MAX_DATA_BYTES as usize {
            self.client.write_attr(Fh(fh), offset, data).await.map(Some)
        } else {
            self.client.write(Fh(fh), offset, data).await.map(|_| None)
        };
        let unlinked = self.inodes.is_unlinked(ino);
        match (&result, self.inodes.path(ino)) {
            // Unlinked while open: no path to cache; `fstat` answers from the inode's attributes.
            (Ok(Some(a)), _) if unlinked && self.inodes.is(ino, a.ino) => {
                self.inodes.update_attr(ino, a);
            }
            // Only the cache: the inode keeps the attributes seen at open, so the next open
            // still compares against those (close-to-open, as before).
            (Ok(Some(a)), Some(p)) if !unlinked && self.inodes.is(ino, a.ino) => self.cache.refresh(&p, a),
            (_, Some(p)) if !unlinked => self.cache.invalidate_attr(&p),
            _ => {}
        }
        result.map_err(|e| errno(&e))?;
        Ok(len)
    }

    /// `flush` (each `close`): writes are not buffered here, so what remains is releasing the
    /// POSIX locks of the closing owner, if it took any through this handle. `false`: nothing
    /// to do, and the kernel is answered without a round trip (the common case).
    pub fn flush_needs_unlock(&self, fh: u64, lock_owner: u64) -> bool {
        self.handles.take_lock_owner(fh, lock_owner)
    }

    /// `flush` of a server handle that has to wait (queued writes, or locks to release): the
    /// writes' error is close's to report, and the owner's locks go.
    pub async fn flush_handle(&self, ino: u64, fh: u64, lock_owner: u64) -> R<()> {
        self.writes.settle(ino).await;
        let written = self.write_error(fh);
        let unlocked =
            if self.flush_needs_unlock(fh, lock_owner) { self.flush_unlock(fh, lock_owner).await } else { Ok(()) };
        written.and(unlocked)
    }

    /// `release` of a server handle, waited for: its locks go, then the handle (a failure is
    /// only logged: nothing is left to report it to).
    pub async fn release_handle(&self, ino: u64, fh: u64) {
        let owners = self.release_owners(fh);
        self.writes.settle(ino).await;
        if let Err(e) = self.write_error(fh) {
            tracing::warn!(fh, error = ?e, "a write failed after the file's last flush");
        }
        if owners.is_empty() {
            self.close_quietly(fh).await
        } else if let Err(e) = self.release(fh, owners).await {
            tracing::debug!(fh, error = ?e, "release failed");
        }
    }

    /// The rest of a `flush` that [`Remote::flush_needs_unlock`]: the owner's locks go.
    pub async fn flush_unlock(&self, fh: u64, lock_owner: u64) -> R<()> {
        self.unlock_all(fh, lock_owner).await
    }

    /// The lock owners of a handle being released, forgotten. None (the common case): the
    /// kernel is answered at once and [`Remote::close_quietly`] runs in the background, since
    /// every write was answered already, a failed close has nothing to report, and no later
    /// request uses the handle. Some: [`Remote::release`] unlocks them first, before the
    /// kernel is answered (another process may be about to take those locks).
    pub fn release_owners(&self, fh: u64) -> Vec<u64> {
        self.handles.take_all_lock_owners(fh)
    }

    /// `release` (the last close) of a handle with locks: the locks go, then the handle.
    pub async fn release(&self, fh: u64, owners: Vec<u64>) -> R<()> {
        for owner in owners {
            if let Err(e) = self.unlock_all(fh, owner).await {
                tracing::debug!(fh, owner, error = ?e, "unlock at release failed");
            }
        }
        self.client.close(Fh(fh)).await.map_err(|e| errno(&e))
    }

    /// `release` of a handle without locks, after the kernel was answered.
    pub async fn close_quietly(&self, fh: u64) {
        if let Err(e) = self.client.close(Fh(fh)).await {
            tracing::debug!(fh, error = %e, "close after release failed");
        }
    }

    async fn unlock_all(&self, fh: u64, owner: u64) -> R<()> {
        // A lock released is a promise to other clients that what was done under it is on the
        // server: unlinks answered behind too (sqlite deletes its journal, then unlocks).
        self.wait_for_all_unlinks().await;
        let spec = LockSpec { kind: LockKind::Unlock, start: 0, end: u64::MAX, owner, pid: 0, flock: false };
        self.client.lock(Fh(fh), spec, false).await.map_err(|e| errno(&e))
    }

    pub async fn fsync(&self, fh: u64, datasync: bool) -> R<()> {
        self.client.fsync(Fh(fh), datasync).await.map_err(|e| errno(&e))
    }

    /// `opendir`: the whole listing, with attributes, is taken now and served from memory at
    /// stable offsets: from the cache when it holds the listing (no round trip), else from the
    /// server (one round trip per page), which the cache then keeps. Returns the handle and
    /// whether the kernel may keep the listing it has of the directory (`handles.rs`).
    pub async fn opendir(self: &Arc<Self>, ino: u64) -> R<(u64, Option<bool>)> {
        let path = self.path(ino)?;
        let taken_at = self.cache.generation();
        let created = self.created_in(&path);
        let mut cached = self.cache.listing(&path);
        if cached.is_none() {
            self.wait_for_unlinks_in(&path).await;
            // A read-ahead of this directory in flight answers it soon.
            self.prefetch.wait(&path).await;
            cached = self.cache.listing(&path);
        }
        let entries = match cached {
            Some(entries) => {
                Hits::add(&self.hits.readdir);
                entries
            }
            None => {
                let generation = self.cache.generation();
                let entries = self.client.read_dir(&path).await.map_err(|e| errno(&e))?;
                self.cache.put_listing(&path, &entries, generation);
                entries
            }
        };
        self.read_ahead(&path, &entries);
        self.read_ahead_siblings(&path);
        let entries = self.with_created(created, entries).await;
        let inos = entries.iter().map(|e| self.inodes.fuse_ino(e.attr.ino)).collect();
        Ok(self.handles.open_dir(DirSnapshot::new(ino, ino, entries, inos, taken_at), self.cache.ttl()))
    }

    /// `lookup` answered from the cache alone, on the caller's (FUSE) thread: `None` when it
    /// needs the runtime (not cached, or writes queued on the file would make its size old).
    pub fn lookup_cached(&self, parent: u64, name: &[u8]) -> Option<Option<Entry>> {
        let path = self.child(parent, name).ok()?;
        if let Some(pending) = self.created_entry_now(&path) {
            return pending.map(Some);
        }
        match self.cache.get(&path)? {
            Cached::Present(a) if self.writes_pending_on(a.ino).is_some() => None,
            Cached::Present(a) => {
                Hits::add(&self.hits.lookup);
                Some(Some(self.known(&path, &a)))
            }
            Cached::Absent => {
                Hits::add(&self.hits.lookup_absent);
                Some(None)
            }
        }
    }

    /// An answer from the cache alone: `Some(None)` is a known absence.
    fn cached_lookup(&self, path: &WirePath) -> Option<Option<Attr>> {
        match self.cache.get(path)? {
            Cached::Present(a) => {
                Hits::add(&self.hits.lookup);
                Some(Some(a))
            }
            Cached::Absent => {
                Hits::add(&self.hits.lookup_absent);
                Some(None)
            }
        }
    }

    /// Fetches one page of `dir`'s listing into the cache; a directory with more is remembered
    /// as big and left to per-name stats. Errors are left to the caller's own request.
    async fn fetch_listing_page(&self, dir: &WirePath) {
        let generation = self.cache.generation();
        match self.client.read_dir_page(dir, None, LISTING_PAGE).await {
            Ok((entries, false)) => self.cache.put_listing(dir, &entries, generation),
            Ok((_, true)) => self.prefetch.mark_big(dir),
            Err(_) => {}
        }
    }

    /// Directory read-ahead: the listings of up to [`READ_AHEAD_DIRS`] subdirectories of `dir`
    /// not cached yet are fetched in the background, a bounded number at once.
    fn read_ahead(self: &Arc<Self>, dir: &WirePath, entries: &[DirEntry]) {
        if self.cache.ttl().is_zero() {
            return;
        }
        let subdirs = entries
            .iter()
            .filter(|e| e.attr.kind == FileKind::Dir)
            .filter_map(|e| dir.join(&e.name).ok())
            .filter(|p| !self.cache.is_complete_dir(p) && !self.prefetch.is_big(p))
            .filter(|p| self.prefetch.claim(p))
            .take(READ_AHEAD_DIRS);
        self.fetch_ahead(subdirs);
    }

    /// The sliding window: a walk (`ls -R`, `find`) that opens `dir` goes on to its next
    /// siblings, so the [`READ_AHEAD_DIRS`] subdirectories of its parent listed after it are
    /// kept fetched (those not cached or in flight yet), not only the parent's first ones.
    fn read_ahead_siblings(self: &Arc<Self>, dir: &WirePath) {
        if self.cache.ttl().is_zero() {
            return;
        }
        let Some((parent, name)) = dir.split_last() else { return };
        let window = self.cache.subdirs_after(&parent, name, READ_AHEAD_DIRS);
        let subdirs = window
            .into_iter()
            .filter(|p| !self.cache.is_complete_dir(p) && !self.prefetch.is_big(p))
            .filter(|p| self.prefetch.claim(p));
        self.fetch_ahead(subdirs);
    }

    /// Fetches each of `subdirs` (claimed by the caller) in the background, a bounded number
    /// at once.
    fn fetch_ahead(self: &Arc<Self>, subdirs: impl Iterator<Item = WirePath>) {
        for sub in subdirs {
            let me = self.clone();
            tokio::spawn(async move {
                me.wait_for_unlinks_in(&sub).await;
                if let Ok(_permit) = me.prefetch.slots.clone().acquire_owned().await {
                    if !me.cache.is_complete_dir(&sub) {
                        me.fetch_listing_page(&sub).await;
                    }
                }
                me.prefetch.release(&sub);
            });
        }
    }

    /// `statfs`: the last figures while fresh, else asked once the writes and the unlinks
    /// answered behind are done (`df` shows the space they take and free; `usage.rs`).
    pub async fn statfs(&self) -> R<StatFs> {
        self.usage_figures().await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn copy_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> R<u32> {
        self.writable()?;
        let len = len.min(MAX_COPY_BYTES);
        let result = self.client.copy_range(Fh(fh_in), offset_in, Fh(fh_out), offset_out, len).await;
        if let Some(path) = self.inodes.path(ino_out) {
            self.cache.invalidate_attr(&path);
        }
        let copied = result.map_err(|e| errno(&e))?;
        Ok(copied.min(MAX_COPY_BYTES) as u32)
    }

    /// `getlk`: the conflicting lock as `(start, end, type, pid)`, `F_UNLCK` when none.
    pub async fn getlk(&self, fh: u64, spec: LockSpec) -> R<(u64, u64, i32, u32)> {
        match self.client.test_lock(Fh(fh), spec).await.map_err(|e| errno(&e))? {
            None => Ok((0, 0, libc::F_UNLCK, 0)),
            Some(l) => {
                let typ = match l.kind {
                    LockKind::Read => libc::F_RDLCK,
                    LockKind::Write => libc::F_WRLCK,
                    LockKind::Unlock => libc::F_UNLCK,
                };
                Ok((l.start, kernel_end(l.end), typ, l.pid))
            }
        }
    }

    /// `setlk`: a blocking request re-sends while the server answers `WouldBlock` after its own
    /// bounded wait, until granted or the waiting process is gone. (fuser does not pass
    /// `FUSE_INTERRUPT` on; a fatal signal still ends the waiter, and we notice it here.)
    pub async fn setlk(&self, ino: u64, fh: u64, spec: LockSpec, sleep: bool) -> R<()> {
        if spec.kind == LockKind::Unlock {
            // As in `unlock_all`: what this mount removed under the lock lands first.
            self.wait_for_all_unlinks().await;
        }
        loop {
            let asked = Instant::now();
            match self.client.lock(Fh(fh), spec, sleep).await {
                Ok(()) => {
                    if spec.kind != LockKind::Unlock {
                        self.handles.add_lock_owner(fh, spec.owner);
                        if !self.notices.wait(LOCK_INVALIDATE_TIMEOUT).await {
                            tracing::warn!(ino, "change notices not applied in time after a lock grant");
                        }
                        self.drop_cached_pages(ino).await;
                    }
                    return Ok(());
                }
                Err(e) if sleep && e.code == ErrorCode::WouldBlock => {
                    if !is_alive(spec.pid) {
                        return Err(Errno::EINTR);
                    }
                    let waited = asked.elapsed();
                    if waited < LOCK_RETRY_PACE {
                        tokio::time::sleep(LOCK_RETRY_PACE - waited).await;
                    }
                }
                Err(e) => return Err(errno(&e)),
            }
        }
    }
}

impl Remote {
    /// A lock was granted: what the kernel cached of the file may predate another mount's
    /// writes under the previous holder, so its pages and attributes go (as NFS does on lock).
    /// The kernel may wait on a page lock held by a read we are about to answer, so this runs
    /// on the blocking pool, never on a runtime worker.
    async fn drop_cached_pages(&self, ino: u64) {
        let Some(n) = self.notifier.get().cloned() else { return };
        let done = tokio::task::spawn_blocking(move || n.inval_inode(INodeNo(ino), 0, 0));
        if let Err(e) = tokio::time::timeout(LOCK_INVALIDATE_TIMEOUT, done).await {
            tracing::warn!(ino, error = %e, "page cache invalidation after lock took too long");
        }
    }
}

/// A lock request from the kernel in wire form. `flock(2)` locks arrive here as whole-file
/// POSIX locks whose owner is the open file (the kernel emulates them so, and fuser does not
/// pass `FUSE_LK_FLOCK` on), which gives them flock's semantics between owners.
pub fn lock_spec(typ: i32, start: u64, end: u64, owner: u64, pid: u32) -> R<LockSpec> {
    let kind = match typ {
        libc::F_RDLCK => LockKind::Read,
        libc::F_WRLCK => LockKind::Write,
        libc::F_UNLCK => LockKind::Unlock,
        _ => return Err(Errno::EINVAL),
    };
    let end = if end >= OFFSET_MAX { u64::MAX } else { end };
    Ok(LockSpec { kind, start, end, owner, pid, flock: false })
}

fn kernel_end(end: u64) -> u64 {
    end.min(OFFSET_MAX)
}

fn is_alive(pid: u32) -> bool {
    pid == 0 || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Open flags in wire form.
pub fn open_flags(flags: i32) -> OpenFlags {
    let acc = flags & libc::O_ACCMODE;
    OpenFlags {
        read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        append: flags & libc::O_APPEND != 0,
        create: flags & libc::O_CREAT != 0,
        exclusive: flags & libc::O_EXCL != 0,
        truncate: flags & libc::O_TRUNC != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_map() {
        let f = open_flags(libc::O_WRONLY | libc::O_APPEND);
        assert!(f.write && !f.read && f.append && !f.truncate);
        let f = open_flags(libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        assert!(f.read && f.write && f.create && f.exclusive && f.truncate);
        assert!(open_flags(libc::O_RDONLY).read);
    }

    #[test]
    fn lock_ranges_map() {
        let l = lock_spec(libc::F_WRLCK, 0, OFFSET_MAX, 7, 1).unwrap();
        assert_eq!((l.kind, l.end, l.owner), (LockKind::Write, u64::MAX, 7));
        assert_eq!(kernel_end(u64::MAX), OFFSET_MAX);
        assert_eq!(lock_spec(99, 0, 1, 0, 0), Err(Errno::EINVAL));
    }
}
