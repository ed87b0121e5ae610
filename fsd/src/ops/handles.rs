//! The open files of one session: a bounded table from [`Fh`] to the server's fd. Handle numbers
//! are never reused within a session, so a stale handle can never reach another file.

use homefs_shared::{ErrorCode, Fh};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
