//! Write-behind: a `write` is answered as soon as it is queued, and its round trip overlaps the
//! caller's next write. What must not change does not:
//!
//! - **Errors surface** (issue 4: on write, close or fsync): a failed write is kept for its
//!   handle and returned by the next `write`, `flush` (close) or `fsync` on that handle.
//! - **Order**: every other request on the inode (getattr, setattr, lookup, open, read, fsync,
//!   flush, release, locks, copies) first waits until the inode's queued writes are answered
//!   ([`WriteBehind::settle`]), so it sees them applied. A write overlapping one still in flight
//!   waits for it too (the server runs requests concurrently). Appends and O_SYNC writes are
//!   not queued.
//! - **Memory**: at most [`MAX_BEHIND_BYTES`] of data are queued per mount; past it, a write
//!   waits for room, as the kernel's writeback does.

use fuser::Errno;
use homefs_shared::Attr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{OwnedRwLockReadGuard, OwnedSemaphorePermit, RwLock, Semaphore};

/// The most data queued and not yet answered, per mount. 16 MiB: with 32 MiB netmount peaked at
/// 64.5 MiB RSS in the benchmark (issue 6 asks under 64); with 16 MiB, 44.4 MiB, and sequential
/// write with fsync ran at the same speed (267 vs 265 MB/s, `scripts/bench.sh` fs phase).
pub const MAX_BEHIND_BYTES: usize = 16 << 20;
/// The semaphore counts KiB.
const UNIT: usize = 1024;

/// The writes in flight on one inode.
#[derive(Default)]
struct InodeWrites {
    /// Each queued write holds a read guard; [`WriteBehind::settle`] takes the write lock.
    gate: Arc<RwLock<()>>,
    /// The byte ranges in flight, by ticket.
    ranges: Mutex<Vec<(u64, u64, u64)>>,
    /// The attributes the answers so far add up to (see [`Ticket::merge`]).
    merged: Mutex<Option<Attr>>,
}

/// A queued write's claim: its room in the budget, its place on the inode, its range.
pub struct Ticket {
    inode: Arc<InodeWrites>,
    id: u64,
    _gate: OwnedRwLockReadGuard<()>,
    _room: OwnedSemaphorePermit,
}

impl Ticket {
    /// This write was answered with `attr`. Writes in flight together may be answered out of
    /// order, and none makes the file smaller or older: the largest size and latest times
    /// among the answers so far are the file as the server has it once all are answered.
    pub fn merge(&self, attr: &Attr) -> Attr {
        let mut merged = lock(&self.inode.merged);
        let m = match *merged {
            Some(old) if old.ino == attr.ino => Attr {
                size: old.size.max(attr.size),
                blocks: old.blocks.max(attr.blocks),
                mtime: old.mtime.max(attr.mtime),
                ctime: old.ctime.max(attr.ctime),
                ..*attr
            },
            _ => *attr,
        };
        *merged = Some(m);
        m
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut ranges = lock(&self.inode.ranges);
        ranges.retain(|(id, _, _)| *id != self.id);
        // None in flight: the next writes start from the server's state (a truncate may come
        // in between, once settled).
        if ranges.is_empty() {
            *lock(&self.inode.merged) = None;
        }
    }
}

/// Queued writes and their errors, for one mount.
pub struct WriteBehind {
    room: Arc<Semaphore>,
    inodes: Mutex<HashMap<u64, Arc<InodeWrites>>>,
    /// The first failed queued write of each handle, not yet reported.
    errors: Mutex<HashMap<u64, Errno>>,
    next: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind {
            room: Arc::new(Semaphore::new(MAX_BEHIND_BYTES / UNIT)),
            inodes: Mutex::new(HashMap::new()),
            errors: Mutex::new(HashMap::new()),
            next: Mutex::new(0),
        }
    }
}

impl WriteBehind {
    fn inode(&self, ino: u64) -> Arc<InodeWrites> {
        lock(&self.inodes).entry(ino).or_default().clone()
    }

    /// Claims a place for a write of `[start, end)` on `ino`: waits for room, and for any write
    /// in flight that overlaps it.
    pub async fn enqueue(&self, ino: u64, start: u64, end: u64) -> Ticket {
        let units = (end.saturating_sub(start) as usize).div_ceil(UNIT).clamp(1, MAX_BEHIND_BYTES / UNIT) as u32;
        let room = self.room.clone().acquire_many_owned(units).await.expect("the write-behind budget is never closed");
        let inode = self.inode(ino);
        loop {
            let overlaps = lock(&inode.ranges).iter().any(|(_, s, e)| *s < end && start < *e);
            if !overlaps {
                break;
            }
            drop(inode.gate.write().await);
        }
        let gate = inode.gate.clone().read_owned().await;
        let id = {
            let mut next = lock(&self.next);
            *next += 1;
            *next
        };
        lock(&inode.ranges).push((id, start, end));
        Ticket { inode, id, _gate: gate, _room: room }
    }

    /// Whether writes are queued on `ino`.
    pub fn pending(&self, ino: u64) -> bool {
        lock(&self.inodes).get(&ino).is_some_and(|w| !lock(&w.ranges).is_empty())
    }

    /// Waits until every write queued on `ino` so far is answered.
    pub async fn settle(&self, ino: u64) {
        let inode = {
            let mut inodes = lock(&self.inodes);
            let Some(w) = inodes.get(&ino) else { return };
            // Nobody else holds it and nothing is queued: forget the inode.
            if Arc::strong_count(w) == 1 && lock(&w.ranges).is_empty() {
                inodes.remove(&ino);
                return;
            }
            w.clone()
        };
        drop(inode.gate.write().await);
    }

    /// A queued write on `fh` failed: kept until the handle's next write, flush or fsync.
    pub fn failed(&self, fh: u64, e: Errno) {
        lock(&self.errors).entry(fh).or_insert(e);
    }

    /// The unreported error of `fh`, if any (reported once).
    pub fn take_error(&self, fh: u64) -> Option<Errno> {
        lock(&self.errors).remove(&fh)
    }

    /// Whether `fh` has an unreported error.
    pub fn has_error(&self, fh: u64) -> bool {
        lock(&self.errors).contains_key(&fh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn settle_waits_for_queued_writes_and_overlaps_wait_too() {
        let wb = Arc::new(WriteBehind::default());
        let t1 = wb.enqueue(5, 0, 4096).await;
        assert!(wb.pending(5));
        // A disjoint write queues at once.
        let t2 = wb.enqueue(5, 4096, 8192).await;
        // settle waits for both.
        let w = wb.clone();
        let settled = tokio::spawn(async move { w.settle(5).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!settled.is_finished(), "settle returned with writes in flight");
        drop(t1);
        drop(t2);
        tokio::time::timeout(Duration::from_secs(5), settled).await.expect("settle ends").expect("joined");
        assert!(!wb.pending(5));
        // An overlapping write waits for the one in flight.
        let t3 = wb.enqueue(5, 0, 100).await;
        let w = wb.clone();
        let overlapping = tokio::spawn(async move { w.enqueue(5, 50, 60).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!overlapping.is_finished(), "an overlapping write went ahead");
        drop(t3);
        let t4 = tokio::time::timeout(Duration::from_secs(5), overlapping).await.expect("queued").expect("joined");
        drop(t4);
        wb.settle(5).await;
    }

    #[test]
    fn errors_are_reported_once_per_handle() {
        let wb = WriteBehind::default();
        wb.failed(3, Errno::EDQUOT);
        wb.failed(3, Errno::EIO);
        assert!(wb.has_error(3));
        assert_eq!(wb.take_error(3), Some(Errno::EDQUOT));
        assert_eq!(wb.take_error(3), None);
    }
}
