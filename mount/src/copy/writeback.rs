//! Writeback started while a download lands, so that the sync that makes a get durable at the end
//! waits only for the tail instead of writing everything: for a streamed file, every [`STEP`]
//! bytes written the kernel is told to start writing that range to disk (without waiting); for a
//! tree of small files, a `syncfs` of the destination's file system runs on a thread of its own
//! each time another part of the tree has landed ([`Flusher`]), while the next batches arrive.
//!
//! `posix_fadvise(DONTNEED)` on a range starts its writeback (WB_SYNC_NONE) and drops the pages
//! that are already clean; dirty pages and pages under writeback stay cached. No `unsafe`
//! (`sync_file_range` is not in rustix); fsd's `Sync` starts writeback the same way.

use std::fs::File;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes between two writeback starts of one file. Measured on a 1 GiB get (2-core VM, fresh
/// ext4 on a loop device): the final sync took ~360 ms when nothing was written back before it.
pub const STEP: u64 = 16 << 20;

/// Which range of a file being written sequentially is due for writeback.
#[derive(Debug)]
pub struct Behind {
    /// Everything before this offset was handed to the kernel already.
    started: u64,
    step: u64,
}

impl Behind {
    /// A file written from `offset` on (what lies before it, a resumed prefix, is not started here).
    pub fn new(offset: u64, step: u64) -> Behind {
        Behind { started: offset, step: step.max(1) }
    }

    /// Once the file holds `written` bytes: the range `(offset, len)` whose writeback to start now,
    /// when at least one step has landed since the last start.
    pub fn due(&mut self, written: u64) -> Option<(u64, u64)> {
        if written < self.started.saturating_add(self.step) {
            return None;
        }
        let range = (self.started, written - self.started);
        self.started = written;
        Some(range)
    }
}

/// Starts the writeback of `len` bytes of `file` from `offset`, without waiting (best effort: a
/// file system that ignores the advice is synced at the end all the same).
pub fn start(file: &File, offset: u64, len: u64) {
    if let Some(len) = NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

/// Fewest files stored between two background `syncfs` of a tree get.
pub const FLUSH_MIN_FILES: usize = 256;
/// A tree get is flushed in the background after each of this many parts of its files. Measured
/// (5,000 x 4 KiB, 6 alternated rounds): the final sync waited 52-73 ms with none, 16-24 ms
/// with 2, 10-26 ms with 3, 5-11 ms with 5; walls (median) 0.316 / 0.308 / 0.294 / 0.307 s: more
/// flushes cost more in total (each waits for a journal commit) while the get runs.
const FLUSH_PARTS: usize = 3;

/// When a tree get's next background `syncfs` is due.
#[derive(Debug)]
pub struct Every {
    step: usize,
    next: usize,
}

impl Every {
    /// For a get of `total` files: one flush after each [`FLUSH_PARTS`]th part of them, at least
    /// [`FLUSH_MIN_FILES`] apart (none for a tree smaller than that).
    pub fn new(total: usize) -> Every {
        let step = (total / FLUSH_PARTS).max(FLUSH_MIN_FILES);
        Every { step, next: step }
    }

    /// Whether a flush is due now that `stored` files landed (and the next one's threshold moves on).
    pub fn due(&mut self, stored: usize) -> bool {
        if stored < self.next {
            return false;
        }
        self.next = stored + self.step;
        true
    }
}

/// Background `syncfs` of a tree get's destination while the get goes on; one at a time, and
/// only when a `syncfs` is the cheaper way to sync (little dirty data of others on the system:
/// see `transfer::sync_local`, which still makes everything durable at the end).
#[derive(Debug)]
pub struct Flusher {
    dir: PathBuf,
    state: Mutex<(usize, Every)>,
    busy: Arc<AtomicBool>,
}

impl Flusher {
    /// For a get of `total` files under the local directory `dir`.
    pub fn new(dir: PathBuf, total: usize) -> Flusher {
        Flusher { dir, state: Mutex::new((0, Every::new(total))), busy: Arc::new(AtomicBool::new(false)) }
    }

    /// `files` more files landed; starts a background `syncfs` when one is due and none runs.
    pub fn stored(&self, files: usize) {
        let stored = {
            let Ok(mut state) = self.state.lock() else { return };
            state.0 += files;
            let stored = state.0;
            if self.busy.load(Ordering::Acquire) || !state.1.due(stored) {
                return;
            }
            stored
        };
        if !homefs_shared::sync_cost::syncfs_is_cheaper(stored, homefs_shared::sync_cost::dirty_bytes()) {
            tracing::debug!(stored, "get: background syncfs skipped (much else is dirty)");
            return;
        }
        self.busy.store(true, Ordering::Release);
        let (dir, busy) = (self.dir.clone(), self.busy.clone());
        let spawned = std::thread::Builder::new().name("netcp-flush".into()).spawn(move || {
            let started = std::time::Instant::now();
            let r = File::open(&dir).and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
            tracing::debug!(stored, elapsed = ?started.elapsed(), ok = r.is_ok(), "get: background syncfs");
            busy.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_step_and_from_where_the_file_starts() {
        let mut b = Behind::new(0, 10);
        assert_eq!(b.due(9), None);
        assert_eq!(b.due(10), Some((0, 10)));
        assert_eq!(b.due(19), None);
        assert_eq!(b.due(25), Some((10, 15)));
        assert_eq!(b.due(25), None);
        // A resumed file: the verified prefix is not started again.
        let mut r = Behind::new(100, 10);
        assert_eq!(r.due(105), None);
        assert_eq!(r.due(110), Some((100, 10)));
    }

    #[test]
    fn tree_flushes_after_each_part_and_not_for_small_trees() {
        let mut e = Every::new(6_000);
        assert!(!e.due(1_999));
        assert!(e.due(2_000));
        assert!(!e.due(3_999));
        assert!(e.due(4_050));
        assert!(!e.due(6_049));
        assert!(e.due(6_050));
        let mut small = Every::new(100);
        assert!(!small.due(100));
        let mut mid = Every::new(600);
        assert!(!mid.due(255));
        assert!(mid.due(256));
        assert!(!mid.due(511));
        assert!(mid.due(512));
    }

    #[test]
    fn flusher_syncs_in_the_background_once_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Flusher::new(dir.path().to_path_buf(), 1_000);
        f.stored(100);
        assert!(!f.busy.load(Ordering::Acquire), "not due after 100 of 1,000 files");
        f.stored(200);
        // Due (256): a syncfs started (unless much is dirty on this machine), and it ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while f.busy.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "waited 30 s for the background syncfs to end");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(f.state.lock().expect("lock").0, 300);
    }

    #[test]
    fn started_writeback_leaves_the_bytes_in_place() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::create(&path).expect("create");
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let mut b = Behind::new(0, 1 << 20);
        let mut started = 0;
        for chunk in data.chunks(256 << 10) {
            f.write_all(chunk).expect("write");
            let written = f.metadata().expect("stat").len();
            if let Some((off, len)) = b.due(written) {
                start(&f, off, len);
                started += len;
            }
        }
        assert_eq!(started, 3 << 20);
        start(&f, 0, 0);
        drop(f);
        let mut back = Vec::new();
        File::open(&path).expect("open").read_to_end(&mut back).expect("read");
        assert!(back == data, "the file reads back as written");
    }
}
