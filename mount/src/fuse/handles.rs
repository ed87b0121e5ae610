//! Open-handle state the kernel does not keep for us: directory snapshots served to `readdir`
//! at stable offsets, which lock owners took locks through each open file (so `flush` and
//! `release` only send an unlock when there is something to unlock), and how many files are
//! open on each inode (an unlink of an open file is not answered behind).
//!
//! A file's FUSE handle is the client's [`homefs_shared::Fh`] number itself: the client keeps it
//! valid across reconnects, so no table is needed for files.

use homefs_shared::DirEntry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One directory listing, taken at `opendir`, so offsets stay valid while it is read.
#[derive(Debug)]
pub struct DirSnapshot {
    /// FUSE inode of the directory itself (for `.`).
    pub ino: u64,
    /// FUSE inode of its parent (for `..`).
    pub parent_ino: u64,
    pub entries: Vec<DirEntry>,
}

/// Directory snapshots and lock owners, by handle.
#[derive(Debug, Default)]
pub struct Handles {
    next_dir: AtomicU64,
    /// Guards the open directory snapshots, by directory handle.
    dirs: Mutex<HashMap<u64, Arc<DirSnapshot>>>,
    /// Guards the lock owners that hold (or held) a lock through each file handle.
    lock_owners: Mutex<HashMap<u64, HashSet<u64>>>,
    /// Guards the count of open file handles, by FUSE inode.
    open_files: Mutex<HashMap<u64, u64>>,
}

impl Handles {
    pub fn new() -> Handles {
        Handles::default()
    }

    /// Keeps a snapshot; returns its handle.
    pub fn open_dir(&self, snapshot: DirSnapshot) -> u64 {
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed) + 1;
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(snapshot));
        fh
    }

    /// The snapshot behind a directory handle.
    pub fn dir(&self, fh: u64) -> Option<Arc<DirSnapshot>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned()
    }

    /// Drops a snapshot (`releasedir`).
    pub fn close_dir(&self, fh: u64) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh);
    }

    /// A file handle on `ino` was opened (`open`, `create`).
    pub fn file_opened(&self, ino: u64) {
        *self.open_files.lock().unwrap_or_else(|p| p.into_inner()).entry(ino).or_default() += 1;
    }

    /// A file handle on `ino` was released.
    pub fn file_released(&self, ino: u64) {
        let mut open = self.open_files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ino);
            }
        }
    }

    /// Whether a file handle on `ino` is open through this mount.
    pub fn is_file_open(&self, ino: u64) -> bool {
        self.open_files.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&ino)
    }

    /// `owner` took a lock through `fh`.
    pub fn add_lock_owner(&self, fh: u64, owner: u64) {
        self.lock_owners.lock().unwrap_or_else(|p| p.into_inner()).entry(fh).or_default().insert(owner);
    }

    /// Whether `owner` took a lock through `fh`; it is forgotten (its locks are being released).
    pub fn take_lock_owner(&self, fh: u64, owner: u64) -> bool {
        let mut owners = self.lock_owners.lock().unwrap_or_else(|p| p.into_inner());
        let Some(set) = owners.get_mut(&fh) else { return false };
        let had = set.remove(&owner);
        if set.is_empty() {
            owners.remove(&fh);
        }
        had
    }

    /// Every owner that took a lock through `fh`, forgotten (the handle is being closed).
    pub fn take_all_lock_owners(&self, fh: u64) -> Vec<u64> {
        let mut owners = self.lock_owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.remove(&fh).map(|s| s.into_iter().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_owners_are_taken_once() {
        let h = Handles::new();
        h.add_lock_owner(3, 10);
        h.add_lock_owner(3, 11);
        assert!(h.take_lock_owner(3, 10));
        assert!(!h.take_lock_owner(3, 10));
        assert_eq!(h.take_all_lock_owners(3), vec![11]);
        assert!(h.take_all_lock_owners(3).is_empty());
    }

    #[test]
    fn open_files_are_counted_per_inode() {
        let h = Handles::new();
        h.file_opened(7);
        h.file_opened(7);
        h.file_released(7);
        assert!(h.is_file_open(7));
        h.file_released(7);
        assert!(!h.is_file_open(7));
        h.file_released(7);
        assert!(!h.is_file_open(7));
    }

    #[test]
    fn dir_handles_are_distinct() {
        let h = Handles::new();
        let a = h.open_dir(DirSnapshot { ino: 1, parent_ino: 1, entries: vec![] });
        let b = h.open_dir(DirSnapshot { ino: 2, parent_ino: 1, entries: vec![] });
        assert_ne!(a, b);
        h.close_dir(a);
        assert!(h.dir(a).is_none() && h.dir(b).is_some());
    }
}
