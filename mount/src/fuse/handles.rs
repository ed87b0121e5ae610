//! Open-handle state the kernel does not keep for us: directory snapshots served to `readdir`
//! at stable offsets, which lock owners took locks through each open file (so `flush` and
//! `release` only send an unlock when there is something to unlock), and how many files are
//! open on each inode (an unlink of an open file is not answered behind).
//!
//! Directory listings the kernel keeps: every `opendir` answers `FOPEN_CACHE_DIR`, so the kernel
//! keeps what `readdir` served in the directory's page cache, and `FOPEN_KEEP_CACHE` only when
//! the new snapshot is exactly what was served before (same [`DirSnapshot::fingerprint`]); any
//! other `opendir` makes the kernel drop what it kept. The kernel itself drops it when the
//! directory changes through this mount (its i_version) or its mtime moves. What a handle serves
//! while another snapshot is the kernel's (a handle opened before the listing changed) makes the
//! kernel's copy unknown, and the next `opendir` drops it. A copy is kept at most one cache TTL
//! after it was filled: the names and attributes `readdirplus` gave with it expire then, and a
//! fresh `readdirplus` renews them all at once (else `ls -l` would ask for each entry's attributes
//! one by one). Every stream of a directory reads that one copy, at offsets that are positions:
//! an `opendir` while a stream of another listing of the directory is still open answers no
//! `FOPEN_CACHE_DIR` (else the old stream would continue at its offset in the new copy, skipping
//! or repeating entries); without `FOPEN_KEEP_CACHE` the kernel still drops its copy, and the old
//! stream reads its own snapshot from us. `dbench` opens an unchanged directory
//! four times in five (its name resolution lists the directory for every absent name): each such
//! listing is then read from the kernel's memory, with no `readdirplus` request.
//!
//! A file's FUSE handle is the client's [`homefs_shared::Fh`] number itself: the client keeps it
//! valid across reconnects, so no table is needed for files.

use homefs_shared::DirEntry;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One directory listing, taken at `opendir`, so offsets stay valid while it is read.
#[derive(Debug)]
pub struct DirSnapshot {
    /// FUSE inode of the directory itself (for `.`).
    pub ino: u64,
    /// FUSE inode of its parent (for `..`).
    pub parent_ino: u64,
    pub entries: Vec<DirEntry>,
    /// The FUSE inode of each entry, as given to the kernel (in `entries`' order).
    pub inos: Vec<u64>,
    /// Of everything `readdir` gives the kernel from this snapshot (see [`fingerprint`]).
    pub fingerprint: u64,
    /// The cache's generation before the listing was taken: a change in the directory since
    /// makes `readdirplus` check each entry (`listed.rs`).
    pub generation: u64,
}

impl DirSnapshot {
    /// A snapshot of directory `ino` whose entries have the FUSE inodes `inos`, taken at the
    /// cache's `generation`.
    pub fn new(ino: u64, parent_ino: u64, entries: Vec<DirEntry>, inos: Vec<u64>, generation: u64) -> DirSnapshot {
        let fingerprint = fingerprint(ino, parent_ino, &entries, &inos);
        DirSnapshot { ino, parent_ino, entries, inos, fingerprint, generation }
    }
}

/// A hash of what the kernel keeps of a listing: names, inodes and kinds, in order, with `.`
/// and `..` (attributes are not kept with a cached listing).
pub fn fingerprint(ino: u64, parent_ino: u64, entries: &[DirEntry], inos: &[u64]) -> u64 {
    let mut h = DefaultHasher::new();
    (ino, parent_ino, entries.len()).hash(&mut h);
    for (e, i) in entries.iter().zip(inos) {
        e.name.hash(&mut h);
        i.hash(&mut h);
        e.attr.kind.hash(&mut h);
    }
    h.finish()
}

/// Directories whose kept listing is remembered; past it the memory is cleared, which only
/// makes the next `opendir` of each drop the kernel's copy.
pub const MAX_KERNEL_LISTINGS: usize = 16_384;

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
    /// Guards the fingerprint of the listing the kernel may keep, and when it was filled, by
    /// directory FUSE inode: present only while every `readdir` served since the `opendir` that
    /// set it came from a snapshot with that fingerprint.
    kernel_listings: Mutex<HashMap<u64, (u64, Instant)>>,
}

impl Handles {
    pub fn new() -> Handles {
        Handles::default()
    }

    /// Keeps a snapshot; returns its handle and whether the kernel may keep the listing it has
    /// of the directory (it is this snapshot's, filled less than `ttl` ago). If not, the kernel
    /// drops it at this `opendir`, and this snapshot's becomes the one it keeps.
    pub fn open_dir(&self, snapshot: DirSnapshot, ttl: Duration) -> (u64, Option<bool>) {
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        // Another stream of this directory reads another listing: the kernel's copy is shared by
        // every stream, and their offsets are positions; this one is not cached.
        let other = dirs.values().any(|d| d.ino == snapshot.ino && d.fingerprint != snapshot.fingerprint);
        let keep = {
            let mut kept = self.kernel_listings.lock().unwrap_or_else(|p| p.into_inner());
            if other {
                kept.remove(&snapshot.ino);
                None
            } else {
                let keep = kept
                    .get(&snapshot.ino)
                    .is_some_and(|(fp, filled)| *fp == snapshot.fingerprint && filled.elapsed() < ttl);
                if !keep {
                    if kept.len() >= MAX_KERNEL_LISTINGS {
                        kept.clear();
                    }
                    kept.insert(snapshot.ino, (snapshot.fingerprint, Instant::now()));
                }
                Some(keep)
            }
        };
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed) + 1;
        dirs.insert(fh, Arc::new(snapshot));
        (fh, keep)
    }

    /// `readdir` serves `snapshot` to the kernel, which may keep it: if another snapshot's
    /// listing is the one remembered, what the kernel keeps is no longer known.
    pub fn serving_dir(&self, snapshot: &DirSnapshot) {
        let mut kept = self.kernel_listings.lock().unwrap_or_else(|p| p.into_inner());
        if kept.get(&snapshot.ino).is_none_or(|(fp, _)| *fp != snapshot.fingerprint) {
            kept.remove(&snapshot.ino);
        }
    }

    /// What the kernel keeps of directory `ino` is no longer known (it was served something
    /// other than its snapshot): the next `opendir` drops it.
    pub fn forget_kernel_listing(&self, ino: u64) {
        self.kernel_listings.lock().unwrap_or_else(|p| p.into_inner()).remove(&ino);
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

    fn entry(name: &str, ino: u64) -> DirEntry {
        let attr = homefs_shared::Attr {
            ino,
            kind: homefs_shared::FileKind::File,
            perm: 0o644,
            nlink: 1,
            size: 0,
            blocks: 0,
            atime: Default::default(),
            mtime: Default::default(),
            ctime: Default::default(),
        };
        DirEntry { name: name.as_bytes().to_vec(), attr }
    }

    impl Handles {
        /// Opens `snapshot` within a long TTL: its handle and whether the kernel keeps its copy
        /// (false as well when it is not to cache the listing at all).
        fn open_dir_for_a_while(&self, snapshot: DirSnapshot) -> (u64, bool) {
            let (fh, keep) = self.open_dir(snapshot, Duration::from_secs(3600));
            (fh, keep.unwrap_or(false))
        }

        /// As `ls` does: opendir, then releasedir; whether the kernel kept its copy.
        fn ls(&self, snapshot: DirSnapshot) -> bool {
            let (fh, keep) = self.open_dir_for_a_while(snapshot);
            self.close_dir(fh);
            keep
        }
    }

    fn snapshot(dir: u64, names: &[(&str, u64)]) -> DirSnapshot {
        let entries: Vec<_> = names.iter().map(|(n, i)| entry(n, *i)).collect();
        let inos = names.iter().map(|(_, i)| *i).collect();
        DirSnapshot::new(dir, dir, entries, inos, 0)
    }

    #[test]
    fn the_kernel_keeps_a_listing_only_while_it_is_the_same() {
        let h = Handles::new();
        let keep = h.ls(snapshot(5, &[("a", 10), ("b", 11)]));
        assert!(!keep, "first opendir: the kernel has nothing of ours to keep");
        let keep = h.ls(snapshot(5, &[("a", 10), ("b", 11)]));
        assert!(keep, "same listing: the kernel's copy is it");
        let keep = h.ls(snapshot(6, &[("a", 10), ("b", 11)]));
        assert!(!keep, "another directory");
        for changed in
            [vec![("a", 10)], vec![("a", 10), ("c", 11)], vec![("a", 10), ("b", 12)], vec![("b", 11), ("a", 10)]]
        {
            let keep = h.ls(snapshot(5, &changed));
            assert!(!keep, "changed listing {changed:?}: the kernel drops its copy");
            let keep = h.ls(snapshot(5, &[("a", 10), ("b", 11)]));
            assert!(!keep, "changed back: the kernel's copy is the changed one");
        }
        let keep = h.ls(snapshot(5, &[("a", 10), ("b", 11)]));
        assert!(keep);
    }

    #[test]
    fn a_kept_listing_is_renewed_after_one_ttl() {
        let h = Handles::new();
        let (_, keep) = h.open_dir(snapshot(5, &[("a", 10)]), Duration::ZERO);
        assert_eq!(keep, Some(false));
        let (_, keep) = h.open_dir(snapshot(5, &[("a", 10)]), Duration::ZERO);
        assert_eq!(keep, Some(false), "filled a TTL ago or more: the kernel reads it again, attributes with it");
        let (_, keep) = h.open_dir(snapshot(5, &[("a", 10)]), Duration::from_secs(3600));
        assert_eq!(keep, Some(true), "filled (again) by the previous opendir, within the TTL");
    }

    #[test]
    fn serving_an_older_snapshot_makes_the_kernels_copy_unknown() {
        let h = Handles::new();
        let (fh, _) = h.open_dir_for_a_while(snapshot(5, &[("a", 10), ("b", 11)]));
        h.serving_dir(&h.dir(fh).expect("open"));
        assert!(h.ls(snapshot(5, &[("a", 10), ("b", 11)])), "served only the remembered snapshot");
        // A snapshot served that is not the remembered one (a handle opened before a change).
        let other = h.open_dir_for_a_while(snapshot(5, &[("a", 10)])).0;
        h.close_dir(fh);
        h.serving_dir(&h.dir(other).expect("open"));
        h.close_dir(other);
        assert!(!h.ls(snapshot(5, &[("a", 10), ("b", 11)])), "the other handle may have filled the kernel's copy");
        h.forget_kernel_listing(5);
        assert!(!h.ls(snapshot(5, &[("a", 10), ("b", 11)])), "forgotten");
    }

    /// Every stream of a directory reads the kernel's one copy, at offsets that are positions: a
    /// listing is not cached while a stream of another listing of the directory is open (it would
    /// continue at its offset in the new copy, skipping or repeating entries).
    #[test]
    fn a_listing_is_not_cached_while_a_stream_of_another_listing_is_open() {
        let h = Handles::new();
        let (old, _) = h.open_dir_for_a_while(snapshot(5, &[("a", 10), ("b", 11)]));
        let (same, keep) = h.open_dir(snapshot(5, &[("a", 10), ("b", 11)]), Duration::from_secs(3600));
        assert_eq!(keep, Some(true), "the same listing: shared safely");
        let (new, keep) = h.open_dir(snapshot(5, &[("b", 11)]), Duration::from_secs(3600));
        assert_eq!(keep, None, "another listing while the old streams are open: not cached");
        let (_, keep) = h.open_dir(snapshot(6, &[("a", 10)]), Duration::from_secs(3600));
        assert_eq!(keep, Some(false), "another directory is not concerned");
        h.close_dir(old);
        h.close_dir(same);
        let (_, keep) = h.open_dir(snapshot(5, &[("b", 11)]), Duration::from_secs(3600));
        assert_eq!(keep, Some(false), "the old streams closed: cached again, the kernel's copy dropped first");
        h.close_dir(new);
    }

    #[test]
    fn dir_handles_are_distinct() {
        let h = Handles::new();
        let (a, _) = h.open_dir_for_a_while(DirSnapshot::new(1, 1, vec![], vec![], 0));
        let (b, _) = h.open_dir_for_a_while(DirSnapshot::new(2, 1, vec![], vec![], 0));
        assert_ne!(a, b);
        h.close_dir(a);
        assert!(h.dir(a).is_none() && h.dir(b).is_some());
    }
}
