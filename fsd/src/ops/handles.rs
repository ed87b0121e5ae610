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
    /// How far the writeback of what this handle wrote front to back was started.
    pub behind: WriteBehind,
}

/// Where the writeback of a file written front to back stands (see `file::write`, which starts it
/// every [`WriteBehind::STEP`] bytes, so that the sync ending a large upload waits for the tail
/// only). Writes of one file arrive a few at a time and may finish out of order, so the front
/// (the end of the furthest write) is followed, and only what lies [`WriteBehind::LAG`] behind
/// it is started: by then every write below it has landed.
#[derive(Debug, Default)]
pub struct WriteBehind {
    /// `(front, started)`: the end of the furthest write so far, and the offset up to which
    /// writeback was started; `None` before the first write. Held for the arithmetic only.
    state: Mutex<Option<(u64, u64)>>,
}

impl WriteBehind {
    /// Bytes between two writeback starts: as netcp's downloads do (mount/src/copy/writeback.rs);
    /// a file smaller than this is never started here (its sync writes it).
    pub const STEP: u64 = 16 << 20;
    /// How far behind the front writeback starts: more than the writes one client keeps in
    /// flight (netcp: 16 x 256 KiB), so that a write still on its way does not land in a range
    /// already started (harmless, but then written twice).
    pub const LAG: u64 = 8 << 20;

    /// Records a write of `[offset, end)`; returns the range `(offset, len)` whose writeback is
    /// due now. A write that jumps ahead of the front by more than [`Self::LAG`] starts a new run
    /// from where it landed (nothing before it is started: it was not written here); writes
    /// behind the front change nothing.
    pub fn due(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (front, started) = match *state {
            Some((front, _)) if offset > front.saturating_add(Self::LAG) => (end, offset),
            Some((front, started)) => (front.max(end), started),
            None => (end, offset),
        };
        let upto = front.saturating_sub(Self::LAG);
        let due = (upto >= started.saturating_add(Self::STEP)).then(|| (started, upto - started));
        *state = Some((front, due.map_or(started, |_| upto)));
        due
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn writeback_is_due_every_step_behind_the_front() {
        let b = WriteBehind::default();
        // 1 MiB writes from 0: nothing until the front is a step plus the lag ahead.
        let mut due = Vec::new();
        for i in 0..64 {
            due.extend(b.due(i * MIB, (i + 1) * MIB));
        }
        assert_eq!(due, vec![(0, 16 * MIB), (16 * MIB, 16 * MIB), (32 * MIB, 16 * MIB)]);
        // Late writes behind the front, and a rewrite near the start, change nothing.
        assert_eq!(b.due(60 * MIB, 61 * MIB), None);
        assert_eq!(b.due(0, MIB), None);
        // Out of order within the lag: the front moves with the furthest write.
        assert_eq!(b.due(71 * MIB, 72 * MIB), Some((48 * MIB, 16 * MIB)));
        assert_eq!(b.due(64 * MIB, 65 * MIB), None);
    }

    #[test]
    fn a_jump_ahead_starts_over_where_it_landed() {
        let b = WriteBehind::default();
        // A resumed upload's first write: nothing before it is started.
        assert_eq!(b.due(100 * MIB, 101 * MIB), None);
        assert_eq!(b.due(101 * MIB, 123 * MIB), None);
        assert_eq!(b.due(123 * MIB, 125 * MIB), Some((100 * MIB, 17 * MIB)));
        // Far ahead (a seek): a new run from there.
        assert_eq!(b.due(500 * MIB, 501 * MIB), None);
        assert_eq!(b.due(501 * MIB, 524 * MIB), Some((500 * MIB, 16 * MIB)));
        // A small file never gets there.
        let small = WriteBehind::default();
        assert_eq!(small.due(0, 20 * MIB), None);
    }
}
