//! Create-behind: a `create` of a name the cache knows to be absent is answered at once, with a
//! provisional inode and handle number (`inodes::PROVISIONAL_BASE` up), and the file's data is
//! kept here; its first `flush` (close) stores it with ONE `PutFile { exclusive }`, waits for
//! that answer and returns its error. A new small file costs one round trip instead of two
//! (create, then the close's queued write). One exception: a close that finds nothing written
//! or set, without `O_EXCL`, while the closing process still holds the file on another
//! descriptor, leaves it pending (a shell's `cmd > f` closes its first descriptor after `dup2`,
//! before the command writes); the next close stores it (`: > f` too: the restoring `dup2`
//! closes it, and the file is on the server when the shell returns). What must not change does
//! not:
//!
//! - **What users see while it is pending**: lookup, getattr/fstat, readdir and `ls -l` answer
//!   from the pending state (size, mode, times; owner as every file here). `chmod`, `touch -m`,
//!   `futimens`, `ftruncate` within the buffer and a chown to ourselves are absorbed. An explicit
//!   atime (`cp -p`, `touch -a`) is kept too and sent as one `SetAttr` after the store: PutFile
//!   sets only the mtime, and a time the user set must not be lost for a round trip saved.
//! - **Materialize first**: anything else that touches the file (a second open, fsync, locks,
//!   copy_file_range, link, rename/unlink of it or of a directory above it, rmdir above it, a
//!   setattr that cannot be absorbed, the buffer passing [`MAX_FILE_BYTES`] or the mount's
//!   [`MAX_PENDING_BYTES`]) first stores it; its handle gets a real server handle (`Open`
//!   without create, by the file's current name) when next used, and goes on as any other. Before
//!   its name goes (unlink, rename onto it) that open is done at once, while the name is there.
//!   Unmount stores what is pending. A released handle never opens one (`State::Released`).
//! - **Errors**: the store's error is close's (EDQUOT, ENOSPC, EACCES, EEXIST...). A failed
//!   store takes the name out of the cache, the parent's listing and the kernel's dentries, so
//!   the next lookup asks the server; nothing on the server is touched (exclusive: a file stored
//!   meanwhile by someone else is never replaced). EEXIST when the caller did not ask `O_EXCL`
//!   (someone made the name meanwhile) falls back to what a synchronous create would have done:
//!   `Open` with create, then the writes at their offsets.
//! - **Bounds**: at most [`MAX_FILE_BYTES`] per file, [`MAX_PENDING_BYTES`] and
//!   [`MAX_PENDING_FILES`] per mount (past them: materialize, or a synchronous create); every
//!   wait for a file's state is bounded by [`WAIT_FOR_FILE`], the unmount's drain by [`DRAIN`].
//! - **`st_ino`**: the provisional number, for the life of the mount (`inodes.rs`: a descriptor
//!   and its path agree, and git's index stays valid); another mount or a remount shows the
//!   server's number, so git reads such files once more there.
//! - **Off**: `-o no_create_behind` keeps every create synchronous.

use bytes::Bytes;
use fuser::{Errno, FileAttr};
use homefs_shared::{Attr, DirEntry, ErrorCode, FileKind, SetAttr, SetTime, Timestamp, WirePath};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex as AsyncMutex;

use super::attr::timestamp;
use super::cache::Cached;
use super::inodes::{is_provisional, is_within, PROVISIONAL_BASE};
use super::ops::{errno, open_flags, Entry, Hits, Remote, R};

/// The most data one pending file holds; past it, the file is stored and written through.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most data pending files hold, per mount (buffer capacity); past it, the writer's file
/// is stored and written through.
pub const MAX_PENDING_BYTES: usize = 8 << 20;
/// The most files pending at once, per mount; past it, `create` is synchronous.
pub const MAX_PENDING_FILES: usize = 4096;
/// The most separate written ranges one pending file keeps (for the EEXIST fall-back, which
/// writes them at their offsets); past it, the file is stored.
const MAX_EXTENTS: usize = 64;
/// How long a request waits for a file's store or open in progress (each is bounded by the
/// client's reconnect timeout; this only keeps a wedged one from holding the caller forever).
pub const WAIT_FOR_FILE: Duration = Duration::from_secs(120);
/// How long the unmount waits for the pending files to be stored.
pub const DRAIN: Duration = Duration::from_secs(90);
/// The mode bits fsd keeps (`fsd/src/ops/meta.rs` `CLIENT_MODE_BITS`: permissions and the
/// sticky bit, never setuid/setgid): a pending file shows what the server will.
const SERVER_MODE_BITS: u32 = 0o1777;
/// How long a failed close waits for the kernel to drop the name's dentry.
const FORGET_WAIT: Duration = Duration::from_secs(5);
/// `st_blocks` of a pending file counts whole 4 KiB blocks, as the server's ext4 will.
const BLOCK: u64 = 4096;
/// How long a close waits for `/proc` to say whether the closing process holds the file still.
const PROC_WAIT: Duration = Duration::from_secs(1);

/// One file answered by create-behind, from `create` to its `release`. Its provisional number is
/// both its FUSE inode and its FUSE handle (two separate name spaces for the kernel).
pub struct Created {
    ino: u64,
    /// The flags of the `create` (access mode, `O_EXCL`, `O_TRUNC`, `O_APPEND`).
    flags: i32,
    /// Held for each change, and across a store or an open (so others wait for it).
    state: AsyncMutex<State>,
    /// The kernel forgetting the name after a failed store (awaited by the `flush` that reports
    /// it, once the state is free: the kernel may need the parent's lock, held by a request
    /// waiting for this file).
    forgetting: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

enum State {
    /// Not on the server yet.
    Buffered(Box<Pending>),
    /// On the server; `real` is the server handle this FUSE handle stands for, once opened.
    Stored { real: Option<u64> },
    /// The store failed; `error` is still to be reported by a `flush`.
    Failed { error: Option<Errno> },
    /// The handle was released: nothing may open a server handle for it any more.
    Released,
}

/// What a pending file holds.
struct Pending {
    path: WirePath,
    parent: u64,
    name: Vec<u8>,
    mode: u32,
    data: Vec<u8>,
    /// The byte ranges written, sorted and merged (the rest of `data` is holes or extension).
    written: Vec<(u64, u64)>,
    /// The smallest size it was truncated to, if any.
    cut: Option<u64>,
    size_set: bool,
    mode_set: bool,
    mtime: Timestamp,
    /// The mtime was set explicitly (and no write came after).
    mtime_set: bool,
    atime: Timestamp,
    atime_set: bool,
    /// A setattr was absorbed (even `touch`'s times "now", which set nothing explicit): the
    /// caller did something to the file, so its close stores it (see [`Pending::untouched`]).
    attr_set: bool,
    ctime: Timestamp,
    /// Bytes of the mount's budget this file holds (its buffer's capacity).
    charged: usize,
}

impl Pending {
    /// The attributes the server will show once it has the file (`ino`: the provisional one).
    fn attr(&self, ino: u64) -> Attr {
        let size = self.data.len() as u64;
        Attr {
            ino,
            kind: FileKind::File,
            perm: self.mode & 0o7777,
            nlink: 1,
            size,
            blocks: size.div_ceil(BLOCK) * (BLOCK / 512),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }

    /// Records `[start, end)` as written.
    fn add_extent(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        self.written.retain(|&(a, b)| {
            let apart = b < s || e < a;
            if !apart {
                s = s.min(a);
                e = e.max(b);
            }
            apart
        });
        let at = self.written.partition_point(|&(a, _)| a < s);
        self.written.insert(at, (s, e));
    }

    /// Nothing written or set since the create (`touch`'s `futimens(fd, NULL)` counts as set: its
    /// file must be on the server, or its error reported, when `touch` returns).
    fn untouched(&self) -> bool {
        self.data.is_empty() && self.cut.is_none() && !self.attr_set
    }

    fn touched(&mut self) {
        let now = now();
        self.mtime = now;
        self.ctime = now;
        self.mtime_set = false;
    }
}

fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// Files answered by create-behind, for one mount.
pub struct Creates {
    enabled: AtomicBool,
    next: AtomicU64,
    /// Guards the files by number, and the pending ones by path.
    table: Mutex<Table>,
    /// Buffer bytes held by pending files ([`MAX_PENDING_BYTES`]).
    bytes: AtomicUsize,
}

#[derive(Default)]
struct Table {
    files: HashMap<u64, Arc<Created>>,
    /// Paths of the files not stored yet (a path cannot change while pending: what would change
    /// it stores the file first).
    paths: HashMap<WirePath, u64>,
}

impl Creates {
    /// `enabled`: `-o create_behind` (the default) or not.
    pub fn new(enabled: bool) -> Creates {
        Creates {
            enabled: AtomicBool::new(enabled),
            next: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            bytes: AtomicUsize::new(0),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Single inserts and removals: a panic cannot leave it half-changed in a way that matters.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, n: u64) -> Option<Arc<Created>> {
        if !is_provisional(n) {
            return None;
        }
        self.table().files.get(&n).cloned()
    }

    fn at(&self, path: &WirePath) -> Option<Arc<Created>> {
        let t = self.table();
        t.paths.get(path).and_then(|n| t.files.get(n)).cloned()
    }

    /// The pending files for whose path `which(path)`.
    fn pending_where(&self, which: impl Fn(&WirePath) -> bool) -> Vec<Arc<Created>> {
        self.pending_paths_where(which).into_iter().map(|(_, c)| c).collect()
    }

    /// As [`Creates::pending_where`], with each file's path.
    fn pending_paths_where(&self, which: impl Fn(&WirePath) -> bool) -> Vec<(WirePath, Arc<Created>)> {
        let t = self.table();
        t.paths
            .iter()
            .filter(|(p, _)| which(p))
            .filter_map(|(p, n)| Some((p.clone(), t.files.get(n)?.clone())))
            .collect()
    }

    /// Whether any file is pending (no lock taken on the common paths when none).
    pub fn any_pending(&self) -> bool {
        !self.table().paths.is_empty()
    }

    /// Files pending now (for tests and the profile).
    pub fn pending(&self) -> usize {
        self.table().paths.len()
    }

    /// Takes `bytes` of the mount's budget, if there is room.
    fn charge(&self, bytes: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + bytes <= MAX_PENDING_BYTES).then_some(b + bytes)
            })
            .is_ok()
    }

    fn refund(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Makes room in `p`'s buffer for `len` bytes, charged to the budget; false when the file or
    /// the mount has no room (the file is then stored instead).
    fn reserve(&self, p: &mut Pending, len: usize) -> bool {
        if len > MAX_FILE_BYTES {
            return false;
        }
        if len <= p.charged {
            return true;
        }
        // Doubling (as a Vec would), within the file's cap: appends copy O(n) in all.
        let want = len.max((p.charged * 2).min(MAX_FILE_BYTES)).max(BLOCK as usize);
        let want = if self.charge(want - p.charged) {
            want
        } else if self.charge(len - p.charged) {
            len
        } else {
            return false;
        };
        p.data.reserve_exact(want - p.data.len());
        p.charged = want;
        true
    }

    /// Writes `data` at `start` into the buffer; false when it does not fit (see [`Creates::reserve`]).
    fn buffer(&self, p: &mut Pending, start: u64, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        let Some(end) = start.checked_add(data.len() as u64) else { return false };
        if end > MAX_FILE_BYTES as u64
            || (p.written.len() >= MAX_EXTENTS && !p.written.iter().any(|&(_, e)| e == start))
        {
            return false;
        }
        if !self.reserve(p, end as usize) {
            return false;
        }
        let (s, e) = (start as usize, end as usize);
        if p.data.len() < e {
            p.data.resize(e, 0);
        }
        p.data[s..e].copy_from_slice(data);
        if s < e {
            p.add_extent(start, end);
        }
        p.touched();
        true
    }

    /// `ftruncate` within the buffer; false when the new size does not fit.
    fn resize(&self, p: &mut Pending, size: u64) -> bool {
        if size > MAX_FILE_BYTES as u64 || !self.reserve(p, size as usize) {
            return false;
        }
        p.data.resize(size as usize, 0);
        p.written.retain_mut(|(s, e)| {
            *e = (*e).min(size);
            *s < *e
        });
        p.cut = Some(p.cut.map_or(size, |c| c.min(size)));
        p.size_set = true;
        p.touched();
        true
    }

    /// The file is stored (or given up): its path is no longer pending, its buffer no longer held.
    fn settled(&self, n: u64, path: &WirePath, charged: usize) {
        let mut t = self.table();
        if t.paths.get(path) == Some(&n) {
            t.paths.remove(path);
        }
        drop(t);
        self.refund(charged);
    }
}

/// Whether process `pid` still holds the pending file `ino` at `path` (as this mount spells it)
/// on a descriptor: the one being closed has left its table already. From `/proc/PID/fd` and
/// `/proc/PID/fdinfo`, which the kernel answers from its own tables without asking this file
/// system: a link that ends with the path inside the mount (a pending file has one name only:
/// what would add or change one stores it first), whose `ino:` is the file's (not a file of the
/// same name elsewhere; a kernel without that line: the name decides). Unknown (pid 0, no `/proc`,
/// a process gone, past [`PROC_WAIT`]): false, and the file is stored.
async fn still_held(pid: u32, ino: u64, path: &WirePath) -> bool {
    if pid == 0 {
        return false;
    }
    let mut suffix = b"/".to_vec();
    suffix.extend_from_slice(path.as_bytes());
    let look = tokio::task::spawn_blocking(move || {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
        fds.flatten().any(|fd| {
            let named = std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str().as_bytes().ends_with(&suffix));
            named && fdinfo_ino(pid, &fd.file_name()).is_none_or(|n| n == ino)
        })
    });
    matches!(tokio::time::timeout(PROC_WAIT, look).await, Ok(Ok(true)))
}

/// The `ino:` of descriptor `fd` of process `pid`, from `/proc/PID/fdinfo/FD`.
fn fdinfo_ino(pid: u32, fd: &std::ffi::OsStr) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())).ok()?;
    info.lines().find_map(|l| l.strip_prefix("ino:")).and_then(|n| n.trim().parse().ok())
}

/// Waits (bounded) for the file's state.
async fn lock(c: &Created) -> R<tokio::sync::MutexGuard<'_, State>> {
    match tokio::time::timeout(WAIT_FOR_FILE, c.state.lock()).await {
        Ok(guard) => Ok(guard),
        Err(_) => {
            tracing::warn!(ino = c.ino, bound = ?WAIT_FOR_FILE, "gave up waiting for a file created behind");
            Err(Errno::EIO)
        }
    }
}

/// What the FUSE thread can tell of a file without waiting.
enum Peek {
    /// Not pending (never was, or stored, or failed): the usual way.
    Not,
    /// A store or an open is in progress: the waiting way.
    Busy,
    Pending(Attr),
}

fn peek(c: &Created) -> Peek {
    match c.state.try_lock() {
        Err(_) => Peek::Busy,
        Ok(s) => match &*s {
            State::Buffered(p) => Peek::Pending(p.attr(c.ino)),
            _ => Peek::Not,
        },
    }
}

impl Remote {
    /// `create` answered behind, on the caller's thread, when it may be (see the module doc):
    /// the entry and the provisional handle; `None` for a synchronous create.
    pub fn try_create_behind(&self, parent: u64, name: &[u8], mode: u32, flags: i32) -> Option<(Entry, u64)> {
        if !self.creates.enabled.load(Ordering::Relaxed) || self.read_only || self.inodes.provisional_clash() {
            return None;
        }
        // The caller wants each write on the server when it returns.
        if flags & (libc::O_SYNC | libc::O_DSYNC) != 0 {
            return None;
        }
        let path = self.child(parent, name).ok()?;
        if self.cache.get(&path) != Some(Cached::Absent) || self.cache.unlink_pending_at(&path) {
            return None;
        }
        let t = now();
        let pending = Pending {
            path: path.clone(),
            parent,
            name: name.to_vec(),
            mode: mode & SERVER_MODE_BITS,
            data: Vec::new(),
            written: Vec::new(),
            cut: None,
            size_set: false,
            mode_set: false,
            mtime: t,
            mtime_set: false,
            atime: t,
            atime_set: false,
            attr_set: false,
            ctime: t,
            charged: 0,
        };
        let ino = PROVISIONAL_BASE + self.creates.next.fetch_add(1, Ordering::Relaxed);
        let attr = pending.attr(ino);
        {
            let mut table = self.creates.table();
            if table.paths.len() >= MAX_PENDING_FILES || table.paths.contains_key(&path) {
                return None;
            }
            let state = AsyncMutex::new(State::Buffered(Box::new(pending)));
            table.files.insert(ino, Arc::new(Created { ino, flags, state, forgetting: Mutex::new(None) }));
            table.paths.insert(path.clone(), ino);
        }
        self.inodes.add_provisional(ino);
        let entry = self.known(&path, &attr);
        self.handles.file_opened(ino);
        self.dir_touched(parent);
        Hits::add(&self.hits.create_behind);
        Some((entry, ino))
    }

    /// `lookup` of a pending file on the caller's thread: `None` when `path` is not pending,
    /// `Some(None)` when it is busy (the waiting way: [`Remote::created_entry`]).
    pub fn created_entry_now(&self, path: &WirePath) -> Option<Option<Entry>> {
        self.created_attr_at(path).map(|a| a.map(|a| self.known(path, &a)))
    }

    /// The attributes of the file pending at `path`, on the caller's thread: `None` when none
    /// is, `Some(None)` when it is being stored.
    pub fn created_attr_at(&self, path: &WirePath) -> Option<Option<Attr>> {
        if !self.creates.any_pending() {
            return None;
        }
        let c = self.creates.at(path)?;
        match peek(&c) {
            Peek::Not => None,
            Peek::Busy => Some(None),
            Peek::Pending(a) => Some(Some(a)),
        }
    }

    /// `lookup` of a pending file, waiting for a store in progress: `None` when not pending.
    pub async fn created_entry(&self, path: &WirePath) -> R<Option<Entry>> {
        let Some(c) = self.creates.at(path) else { return Ok(None) };
        let s = lock(&c).await?;
        match &*s {
            State::Buffered(p) => Ok(Some(self.known(path, &p.attr(c.ino)))),
            _ => Ok(None),
        }
    }

    /// `getattr` of a pending file on the caller's thread: `None` when `ino` is not pending,
    /// `Some(None)` when it is busy.
    pub fn created_attr_now(&self, ino: u64) -> Option<Option<FileAttr>> {
        let c = self.creates.get(ino)?;
        match peek(&c) {
            Peek::Not => None,
            Peek::Busy => Some(None),
            Peek::Pending(a) => Some(Some(self.owner.file_attr(ino, &a))),
        }
    }

    /// `getattr` of a pending file, waiting for a store in progress: `None` when not pending.
    pub async fn created_attr(&self, ino: u64) -> R<Option<FileAttr>> {
        let Some(c) = self.creates.get(ino) else { return Ok(None) };
        let s = lock(&c).await?;
        match &*s {
            State::Buffered(p) => Ok(Some(self.owner.file_attr(ino, &p.attr(c.ino)))),
            _ => Ok(None),
        }
    }

    /// The files pending in `dir`: taken before its listing is read, and given to
    /// [`Remote::with_created`] with it, so that a file stored in between (in neither the
    /// listing nor the pending set when looked at after) is still listed.
    pub fn created_in(&self, dir: &WirePath) -> Vec<(WirePath, Arc<Created>)> {
        if !self.creates.any_pending() {
            return Vec::new();
        }
        self.creates.pending_paths_where(|p| p.split_last().is_some_and(|(d, _)| d == *dir))
    }

    /// `entries` (a listing of `dir`, read after [`Remote::created_in`] gave `here`) with those
    /// files, as the server will list them.
    pub async fn with_created(&self, here: Vec<(WirePath, Arc<Created>)>, mut entries: Vec<DirEntry>) -> Vec<DirEntry> {
        if here.is_empty() {
            return entries;
        }
        let mut added = false;
        for (path, c) in here {
            let Ok(s) = lock(&c).await else { continue };
            if let State::Buffered(p) = &*s {
                entries.retain(|e| e.name != p.name);
                entries.push(DirEntry { name: p.name.clone(), attr: p.attr(c.ino) });
                added = true;
                continue;
            }
            drop(s);
            // Stored since it was taken: `entries` may have been read before, so it may lack the
            // name (a failed store left the cache without it: then it is not added).
            let Some((_, name)) = path.split_last() else { continue };
            if let (Some(Cached::Present(attr)), false) =
                (self.cache.get(&path), entries.iter().any(|e| e.name == name))
            {
                entries.push(DirEntry { name: name.to_vec(), attr });
                added = true;
            }
        }
        if added {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
        }
        entries
    }

    /// `write` on a provisional handle: into the buffer while it fits, else the file is stored
    /// and the write goes through as any other.
    pub async fn write_created(self: &Arc<Self>, ino: u64, fh: u64, offset: u64, data: Bytes, flags: i32) -> R<u32> {
        self.writable()?;
        let c = self.creates.get(fh).ok_or(Errno::EBADF)?;
        let mut s = lock(&c).await?;
        if let State::Buffered(p) = &mut *s {
            let start = if flags & libc::O_APPEND != 0 { p.data.len() as u64 } else { offset };
            if self.creates.buffer(p, start, &data) {
                return Ok(data.len() as u32);
            }
        }
        let real = self.real_fh_locked(&c, &mut s).await?;
        drop(s);
        let in_order = flags & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC) != 0;
        self.clone().write_behind(ino, real, offset, data, in_order).await
    }

    /// `read` on a provisional handle: from the buffer while pending.
    pub async fn read_created(&self, ino: u64, fh: u64, offset: u64, size: u32) -> R<Bytes> {
        let c = self.creates.get(fh).ok_or(Errno::EBADF)?;
        let mut s = lock(&c).await?;
        if let State::Buffered(p) = &*s {
            let len = p.data.len();
            let start = (offset.min(len as u64)) as usize;
            let end = start.saturating_add(size as usize).min(len);
            return Ok(Bytes::copy_from_slice(&p.data[start..end]));
        }
        let real = self.real_fh_locked(&c, &mut s).await?;
        drop(s);
        self.writes.settle(ino).await;
        self.read(real, offset, size).await
    }

    /// `setattr` of a pending file absorbed on the caller's thread; `None`: the waiting way
    /// ([`Remote::setattr_created`]), or not pending.
    pub fn setattr_created_now(
        &self,
        ino: u64,
        set: SetAttr,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Option<R<FileAttr>> {
        let c = self.creates.get(ino)?;
        let mut s = c.state.try_lock().ok()?;
        let State::Buffered(p) = &mut *s else { return None };
        let answer = self.absorb(ino, p, set, uid, gid)?;
        Some(answer.map(|a| self.owner.file_attr(ino, &a)))
    }

    /// `setattr` of a file answered by create-behind: absorbed while pending when it can be,
    /// else the file is stored first; a provisional `fh` stands for its server handle.
    pub async fn setattr_created(
        &self,
        ino: u64,
        set: SetAttr,
        fh: Option<u64>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> R<FileAttr> {
        let mut real = fh.filter(|f| !is_provisional(*f));
        if let Some(c) = self.creates.get(ino) {
            let mut s = lock(&c).await?;
            if let State::Buffered(p) = &mut *s {
                if let Some(answer) = self.absorb(ino, p, set, uid, gid) {
                    return answer.map(|a| self.owner.file_attr(ino, &a));
                }
                self.store_locked(&c, &mut s, true).await?;
            }
            if let State::Stored { real: Some(r) } = &*s {
                real = real.or(Some(*r));
            }
        }
        self.setattr(ino, set, real, uid, gid).await
    }

    /// A setattr applied to the pending state; `None` when it cannot be (the file is stored).
    fn absorb(&self, ino: u64, p: &mut Pending, set: SetAttr, uid: Option<u32>, gid: Option<u32>) -> Option<R<Attr>> {
        if uid.is_some_and(|u| u != self.owner.uid) || gid.is_some_and(|g| g != self.owner.gid) {
            return Some(Err(Errno::EPERM));
        }
        if let Some(size) = set.size {
            if !self.creates.resize(p, size) {
                return None;
            }
        }
        if let Some(mode) = set.mode {
            p.mode = mode & SERVER_MODE_BITS;
            p.mode_set = true;
        }
        let t = now();
        match set.atime {
            Some(SetTime::At(a)) => (p.atime, p.atime_set) = (a, true),
            Some(SetTime::Now) => (p.atime, p.atime_set) = (t, false),
            None => {}
        }
        match set.mtime {
            Some(SetTime::At(m)) => (p.mtime, p.mtime_set) = (m, true),
            Some(SetTime::Now) => (p.mtime, p.mtime_set) = (t, false),
            None => {}
        }
        if set != SetAttr::default() {
            p.ctime = t;
            p.attr_set = true;
            Hits::add(&self.hits.setattr);
        }
        Some(Ok(p.attr(ino)))
    }

    /// `flush` (each close) of a provisional handle by process `pid`: the first stores the file
    /// and returns the store's error; later ones flush the server handle as any other.
    pub async fn flush_created(&self, ino: u64, fh: u64, lock_owner: u64, pid: u32) -> R<()> {
        let Some(c) = self.creates.get(fh) else { return Ok(()) };
        let mut s = lock(&c).await?;
        // A shell's `cmd > f` opens f, dup2s it to 1 and closes the first descriptor before the
        // command writes: that close finds nothing written while the process still holds the
        // file, and leaves it pending, so the command's own close stores it, in one request
        // still. Any other close stores it, written or not (`: > f`, `exec 3>f; exec 3>&-`: the
        // file is on the server when the shell returns). `O_EXCL` callers want to know at their
        // first close, so theirs is stored at once.
        if let State::Buffered(p) = &*s {
            if p.untouched() && c.flags & libc::O_EXCL == 0 && still_held(pid, c.ino, &p.path).await {
                return Ok(());
            }
        }
        match &mut *s {
            State::Buffered(_) => {
                let stored = self.store_locked(&c, &mut s, false).await;
                drop(s);
                // Once close returns, the caller's next lookup of the name asks us again: the
                // server's number if stored, absent if not.
                let forgetting = c.forgetting.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(h) = forgetting {
                    if tokio::time::timeout(FORGET_WAIT, h).await.is_err() {
                        tracing::debug!(ino, "the kernel's dentry of a name not stored is still being dropped");
                    }
                }
                stored
            }
            State::Failed { error } => error.take().map_or(Ok(()), Err),
            State::Stored { real: None } | State::Released => Ok(()),
            State::Stored { real: Some(real) } => {
                let real = *real;
                drop(s);
                self.flush_handle(ino, real, lock_owner).await
            }
        }
    }

    /// `release` of a provisional handle. One never flushed (not expected) is stored now, its
    /// failure logged; a server handle is released as any other.
    pub async fn release_created(&self, ino: u64, fh: u64) {
        let Some(c) = self.creates.get(fh) else { return };
        let real = match lock(&c).await {
            Ok(mut s) => {
                if let State::Buffered(_) = &*s {
                    if let Err(e) = self.store_locked(&c, &mut s, false).await {
                        tracing::warn!(ino, error = ?e, "a file created behind and released unflushed could not be stored");
                    }
                }
                let real = match &*s {
                    State::Stored { real } => *real,
                    _ => None,
                };
                *s = State::Released;
                real
            }
            Err(_) => None,
        };
        {
            let mut t = self.creates.table();
            t.files.remove(&fh);
            t.paths.retain(|_, n| *n != fh);
        }
        if let Some(real) = real {
            self.release_handle(ino, real).await;
        }
    }

    /// The server handle a FUSE handle stands for: a provisional one's file is stored and
    /// opened first (fsync, locks, copy_file_range...); any other is its own.
    pub async fn real_fh(&self, fh: u64) -> R<u64> {
        if !is_provisional(fh) {
            return Ok(fh);
        }
        let c = self.creates.get(fh).ok_or(Errno::EBADF)?;
        let mut s = lock(&c).await?;
        self.real_fh_locked(&c, &mut s).await
    }

    async fn real_fh_locked(&self, c: &Created, s: &mut State) -> R<u64> {
        if let State::Buffered(_) = s {
            self.store_locked(c, s, true).await?;
        }
        match s {
            State::Stored { real: Some(fh) } => Ok(*fh),
            State::Stored { real } => {
                let path = self.inodes.path(c.ino).ok_or(Errno::ESTALE)?;
                let flags = homefs_shared::OpenFlags {
                    create: false,
                    exclusive: false,
                    truncate: false,
                    ..open_flags(c.flags)
                };
                let (fh, a) = match self.client.open(&path, flags, 0).await {
                    Err(e) if e.code == ErrorCode::Access && flags.write => {
                        self.open_own_read_only(&path, flags).await?
                    }
                    opened => opened.map_err(|e| errno(&e))?,
                };
                if !self.inodes.is(c.ino, a.ino) {
                    // Replaced by another file since: this handle's file has no name left to open.
                    self.close_quietly(fh.0).await;
                    return Err(Errno::ESTALE);
                }
                *real = Some(fh.0);
                Ok(fh.0)
            }
            State::Failed { .. } | State::Buffered(_) => Err(Errno::EIO),
            State::Released => Err(Errno::EBADF),
        }
    }

    /// Opens for writing our own new file created without owner write permission (git's objects,
    /// `cp`/`tar` of a read-only file): a synchronous create's descriptor could write it, so this
    /// one must too. Write permission is lent for the open and taken back (checked at open only).
    async fn open_own_read_only(
        &self,
        path: &WirePath,
        flags: homefs_shared::OpenFlags,
    ) -> R<(homefs_shared::Fh, Attr)> {
        let perm = self.client.stat(path).await.map_err(|e| errno(&e))?.perm & 0o7777;
        if perm & 0o200 != 0 {
            return Err(Errno::EACCES);
        }
        let lend = SetAttr { mode: Some(perm | 0o200), ..SetAttr::default() };
        self.client.setattr(path, None, lend).await.map_err(|e| errno(&e))?;
        let opened = self.client.open(path, flags, 0).await;
        let restored = self.client.setattr(path, None, SetAttr { mode: Some(perm), ..SetAttr::default() }).await;
        let (fh, attr) = opened.map_err(|e| errno(&e))?;
        if let Err(e) = restored {
            self.close_quietly(fh.0).await;
            return Err(errno(&e));
        }
        Ok((fh, attr))
    }

    /// Stores the pending file of inode `ino` first, if there is one (a second open, a link, a
    /// setattr that cannot be absorbed). Its handle opens the stored file by name when next used.
    pub async fn materialize(&self, ino: u64) -> R<()> {
        match self.creates.get(ino) {
            Some(c) => self.store_pending(&c).await,
            None => Ok(()),
        }
    }

    /// Stores first every pending file at or below `path` (rmdir above it, rename of it or of a
    /// directory above it: its handle then opens it by its new name when next used).
    pub async fn materialize_within(&self, path: &WirePath) -> R<()> {
        if !self.creates.any_pending() {
            return Ok(());
        }
        for c in self.creates.pending_where(|p| is_within(p, path)) {
            self.store_pending(&c).await?;
        }
        Ok(())
    }

    /// Before the name goes (unlink, rename onto it): every file created behind and still open
    /// at or below `path` is stored and its handle given a server handle, which the name is not
    /// needed for (it could not be opened by name afterwards).
    pub async fn keep_open_within(&self, path: &WirePath) -> R<()> {
        let open: Vec<Arc<Created>> = {
            let t = self.creates.table();
            if t.files.is_empty() {
                return Ok(());
            }
            t.files.values().cloned().collect()
        };
        for c in open {
            if !self.inodes.path(c.ino).is_some_and(|p| is_within(&p, path)) {
                continue;
            }
            let mut s = lock(&c).await?;
            if let State::Buffered(_) | State::Stored { real: None } = &*s {
                self.real_fh_locked(&c, &mut s).await?;
            }
        }
        Ok(())
    }

    /// The kernel's entry of `name` in `parent` goes (on the blocking pool: the kernel takes the
    /// parent's lock, which a request waiting for this file may hold). The caller may wait for
    /// it once it holds nothing such a request waits for.
    fn drop_entry(&self, parent: u64, name: &[u8]) -> Option<tokio::task::JoinHandle<()>> {
        let notifier = self.notifier.get().cloned()?;
        let name = name.to_vec();
        Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = notifier.inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::from_bytes(&name)) {
                tracing::debug!(parent, error = %e, "inval_entry of a file created behind");
            }
        }))
    }

    async fn store_pending(&self, c: &Created) -> R<()> {
        let mut s = lock(c).await?;
        match &*s {
            State::Buffered(_) => self.store_locked(c, &mut s, true).await,
            _ => Ok(()),
        }
    }

    /// At unmount: every pending file is stored (bounded by [`DRAIN`]).
    pub async fn drain_creates(&self) {
        let all: Vec<Arc<Created>> = self.creates.table().files.values().cloned().collect();
        let work = async {
            for c in all {
                if let Err(e) = self.store_pending(&c).await {
                    tracing::warn!(ino = c.ino, error = ?e, "a file created behind could not be stored at unmount");
                }
            }
        };
        if tokio::time::timeout(DRAIN, work).await.is_err() {
            tracing::warn!(bound = ?DRAIN, "gave up storing the files created behind at unmount");
        }
    }

    /// Stores the buffered file (the caller holds its state): Stored on success; on failure the
    /// name leaves the caches (see the module doc), the state is Failed and keeps the error for
    /// the next `flush` when `report_later`.
    async fn store_locked(&self, c: &Created, s: &mut State, report_later: bool) -> R<()> {
        let State::Buffered(mut p) = std::mem::replace(s, State::Stored { real: None }) else { return Ok(()) };
        let last = p.attr(c.ino);
        let data = Bytes::from(std::mem::take(&mut p.data));
        let stored = self.put_created(c, &p, data).await;
        // Stored (or partly, in the EEXIST fall-back): the usage figures may have moved.
        self.usage.changed();
        match stored {
            Ok((attr, real)) => {
                // The provisional number stays the file's for this mount (inodes.rs).
                self.inodes.alias(attr.ino, c.ino);
                self.cache.put(&p.path, &attr);
                self.inodes.update_attr(c.ino, &attr);
                // The kernel's attributes of the inode are the pending ones (ctime, atime,
                // blocks differ a little): the next stat takes the server's from the cache. Attributes
                // only (offset < 0): no page lock, so this cannot wait on a request of ours.
                if let Some(n) = self.notifier.get() {
                    let _ = n.inval_inode(fuser::INodeNo(c.ino), -1, 0);
                }
                *s = State::Stored { real };
                self.creates.settled(c.ino, &p.path, p.charged);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(path = %p.path, error = ?e, "a file created behind could not be stored; the name is gone");
                self.cache.invalidate(&p.path);
                if let Some(dir) = self.inodes.path(p.parent) {
                    self.cache.invalidate_attr(&dir);
                }
                self.inodes.update_attr(c.ino, &last);
                self.inodes.unlinked_ino(c.ino, &p.path);
                *c.forgetting.lock().unwrap_or_else(|p| p.into_inner()) = self.drop_entry(p.parent, &p.name);
                if let Some(dir) = self.inodes.path(p.parent) {
                    self.cache.invalidate_attr(&dir);
                }
                *s = State::Failed { error: report_later.then_some(e) };
                self.creates.settled(c.ino, &p.path, p.charged);
                Err(e)
            }
        }
    }

    /// One `PutFile { exclusive }` (a lost connection: once more, and an EEXIST then may be our
    /// own first one); then the explicit atime, if any. EEXIST without `O_EXCL`: the fall-back.
    async fn put_created(&self, c: &Created, p: &Pending, data: Bytes) -> R<(Attr, Option<u64>)> {
        // The mtime shown while pending (the last write's, or the one set): `stat` before and
        // after the close agree.
        let mtime = Some(p.mtime);
        let mut result = self.client.put_file(&p.path, p.mode, mtime, true, data.clone()).await;
        if matches!(&result, Err(e) if e.code == ErrorCode::Io) {
            result = self.client.put_file(&p.path, p.mode, mtime, true, data.clone()).await;
            if matches!(&result, Err(e) if e.code == ErrorCode::Exists) {
                if let Some(attr) = self.stored_by_us(&p.path, &data, p.mode).await {
                    result = Ok(([0; 32], attr));
                }
            }
        }
        match result {
            Ok((_, attr)) if p.atime_set => {
                let set =
                    SetAttr { atime: Some(SetTime::At(p.atime)), mtime: mtime.map(SetTime::At), ..SetAttr::default() };
                match self.client.setattr(&p.path, None, set).await {
                    Ok(a) => Ok((a, None)),
                    Err(e) => {
                        // Stored: the file is there; only its atime is not as asked.
                        tracing::warn!(path = %p.path, error = %e, "the atime of a file created behind was not set");
                        Ok((attr, None))
                    }
                }
            }
            Ok((_, attr)) => Ok((attr, None)),
            Err(e) if e.code == ErrorCode::Exists && c.flags & libc::O_EXCL == 0 => {
                tracing::debug!(path = %p.path, "created behind, but the name exists now: writing into it");
                self.store_into_existing(c, p, data).await.map(|(a, fh)| (a, Some(fh)))
            }
            Err(e) => Err(errno(&e)),
        }
    }

    /// Whether the file at `path` is the one we stored (a PutFile whose answer was lost).
    async fn stored_by_us(&self, path: &WirePath, data: &Bytes, mode: u32) -> Option<Attr> {
        let (attr, _, bytes) = self.client.get_file(path, data.len() as u32).await.ok()?;
        (attr.size == data.len() as u64 && attr.perm & SERVER_MODE_BITS == mode && bytes == *data).then_some(attr)
    }

    /// What a synchronous create would have done on a name made meanwhile by someone else:
    /// `Open` with create (truncating only with `O_TRUNC`), the truncations and writes at their
    /// offsets, then the mode and times set explicitly. Returns the server handle, kept open.
    async fn store_into_existing(&self, c: &Created, p: &Pending, data: Bytes) -> R<(Attr, u64)> {
        let flags = homefs_shared::OpenFlags { create: true, exclusive: false, ..open_flags(c.flags) };
        let (fh, _) = self.client.open(&p.path, flags, p.mode).await.map_err(|e| errno(&e))?;
        let applied = async {
            if let Some(cut) = p.cut {
                self.client.setattr(&p.path, Some(fh), SetAttr { size: Some(cut), ..SetAttr::default() }).await?;
            }
            for &(s, e) in &p.written {
                self.client.write(fh, s, data.slice(s as usize..e as usize)).await?;
            }
            let set = SetAttr {
                size: p.size_set.then_some(data.len() as u64),
                mode: p.mode_set.then_some(p.mode),
                atime: p.atime_set.then_some(SetTime::At(p.atime)),
                mtime: p.mtime_set.then_some(SetTime::At(p.mtime)),
            };
            if set != SetAttr::default() {
                self.client.setattr(&p.path, Some(fh), set).await?;
            }
            self.client.stat(&p.path).await
        };
        match applied.await {
            Ok(attr) => Ok((attr, fh.0)),
            Err(e) => {
                self.close_quietly(fh.0).await;
                Err(errno(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        let t = Timestamp::default();
        Pending {
            path: WirePath::new("f").unwrap(),
            parent: 1,
            name: b"f".to_vec(),
            mode: 0o644,
            data: Vec::new(),
            written: Vec::new(),
            cut: None,
            size_set: false,
            mode_set: false,
            mtime: t,
            mtime_set: true,
            atime: t,
            atime_set: false,
            attr_set: false,
            ctime: t,
            charged: 0,
        }
    }

    #[test]
    fn writes_fill_holes_with_zeros_and_merge_their_ranges() {
        let c = Creates::new(true);
        let mut p = pending();
        assert!(c.buffer(&mut p, 4, b"bb"));
        assert!(c.buffer(&mut p, 0, b"aa"));
        assert_eq!(p.data, b"aa\0\0bb");
        assert_eq!(p.written, vec![(0, 2), (4, 6)]);
        assert!(c.buffer(&mut p, 2, b"cc"));
        assert_eq!(p.written, vec![(0, 6)]);
        assert!(!p.mtime_set, "a write after an explicit mtime moves it");
        assert!(c.resize(&mut p, 3));
        assert_eq!((p.data.as_slice(), p.written.as_slice(), p.cut), (&b"aac"[..], &[(0, 3)][..], Some(3)));
        assert_eq!(p.attr(PROVISIONAL_BASE).blocks, 8);
    }

    #[test]
    fn a_file_and_the_mount_are_bounded() {
        let c = Creates::new(true);
        let mut p = pending();
        assert!(!c.buffer(&mut p, MAX_FILE_BYTES as u64, b"x"), "past the file's cap");
        assert!(c.buffer(&mut p, 0, &vec![1u8; MAX_FILE_BYTES]));
        let mut others: Vec<Pending> = Vec::new();
        while c.bytes.load(Ordering::Acquire) + MAX_FILE_BYTES <= MAX_PENDING_BYTES {
            let mut q = pending();
            assert!(c.buffer(&mut q, 0, &vec![2u8; MAX_FILE_BYTES]));
            others.push(q);
        }
        let mut last = pending();
        assert!(!c.buffer(&mut last, 0, &vec![3u8; MAX_FILE_BYTES]), "past the mount's budget");
        c.settled(0, &WirePath::new("f").unwrap(), p.charged);
        assert!(c.buffer(&mut last, 0, &vec![3u8; MAX_FILE_BYTES]), "room again once one is stored");
        assert!(c.bytes.load(Ordering::Acquire) <= MAX_PENDING_BYTES);
    }
}
