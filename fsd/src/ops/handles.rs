//! The open files of one session: a bounded table from [`Fh`] to the server's fd. Handle numbers
//! are never reused within a session, so a stale handle can never reach another file.

use homefs_shared::{ErrorCode, Fh, WirePath};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::lock::FileId;

/// Open files per session. A FUSE mount keeps one handle per open file of every process using
/// it, so this is the mount's limit on simultaneously open files; 1024 matches the usual
/// `ulimit -n`, and bounds the server's fds per connection.
pub const MAX_OPEN_FILES: usize = 1024;

/// One open file.
#[derive(Debug)]
pub struct Handle {
    pub fd: OwnedFd,
    /// Opened with `append`: every write goes to the end.
    pub append: bool,
    /// `(st_dev, st_ino)`: the key of the file's locks.
    pub file: FileId,
    /// The path it was opened with: what change notices name for its writes (a later rename is
    /// not followed; notices are hints).
    pub path: WirePath,
    /// When its writes were last announced.
    pub notice: WriteNotice,
    /// `preadv2(RWF_NOWAIT)` is refused on this file: reads always go to the blocking pool.
    pub no_nowait: AtomicBool,
}

/// How often a handle that keeps being written is announced: a write-heavy session publishes its
/// file's path once per burst of this length, not once per 1 MiB write; its Close (or Fsync)
/// announces the final state.
pub const WRITE_NOTICE_INTERVAL: Duration = Duration::from_millis(100);

/// The change-notice state of one handle.
#[derive(Debug, Default)]
pub struct WriteNotice {
    /// Written since the last announcement (set on every write, announced or not, so that the
    /// Close of a written file is always announced).
    dirty: AtomicBool,
    /// When a write was last announced; guards nothing else.
    last: Mutex<Option<Instant>>,
}

impl WriteNotice {
    /// Records a write (one relaxed store).
    pub fn written(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Whether a write now should be announced: the first of a burst, or the first after
    /// [`WRITE_NOTICE_INTERVAL`]. Records the announcement.
    pub fn is_due(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(t) if now.saturating_duration_since(t) < WRITE_NOTICE_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Whether the file was written since the last Close/Fsync announcement (and clears it).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }
}

/// The table of one session.
#[derive(Debug)]
pub struct Handles {
    /// The next handle number; only ever grows.
    next: AtomicU64,
    /// Open handles; held for map operations only. A request that is using a handle holds an
    /// `Arc`, so a concurrent `Close` cannot close the fd under it.
    open: Mutex<HashMap<u64, Arc<Handle>>>,
}

impl Default for Handles {
    fn default() -> Handles {
        Handles { next: AtomicU64::new(1), open: Mutex::new(HashMap::new()) }
    }
}

impl Handles {
    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        // Map operations cannot leave the map half-changed, so a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether another file may be opened (checked before opening, and again on insert).
    pub fn has_room(&self) -> bool {
        self.open().len() < MAX_OPEN_FILES
    }

    /// Adds an open file.
    ///
    /// # Errors
    /// [`ErrorCode::TooManyFiles`] when the session holds [`MAX_OPEN_FILES`] (the fd is closed).
    pub fn insert(&self, handle: Handle) -> Result<Fh, ErrorCode> {
        let mut open = self.open();
        if open.len() >= MAX_OPEN_FILES {
            return Err(ErrorCode::TooManyFiles);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(n, Arc::new(handle));
        Ok(Fh(n))
    }

    /// The handle `fh`.
    ///
    /// # Errors
    /// [`ErrorCode::BadHandle`] when this session holds no such handle.
    pub fn get(&self, fh: Fh) -> Result<Arc<Handle>, ErrorCode> {
        self.open().get(&fh.0).cloned().ok_or(ErrorCode::BadHandle)
    }

    /// Removes `fh`; its fd closes once no request uses it any more.
    pub fn remove(&self, fh: Fh) -> Option<Arc<Handle>> {
        self.open().remove(&fh.0)
    }

    /// Removes every handle (the session ended).
    pub fn clear(&self) {
        let all: Vec<_> = self.open().drain().collect();
        // The fds close here, outside the table's lock.
        drop(all);
    }

    /// How many handles are open.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
