//! Which requests may run on the runtime thread that handles them instead of hopping to the
//! blocking pool, and the bound that keeps the runtime responsive while they do.
//!
//! A hop to the blocking pool and back costs about three context switches of fsd per request
//! (wake a pool thread, park the runtime thread, wake it with the result): measured on this
//! 2-core machine, 5,000 creates through netmount (one `PutFile` each) took fsd 29,000-30,000
//! context switches and 460-560 ms of CPU through the pool, 7,200-8,800 and 280-400 ms inline.
//! For a short directory operation (an unlink, a small exclusive put, a mkdir) the hop costs more
//! than the operation, and a put is on its writer's critical path (the close waits for it).
//!
//! Short means: no bulk data and no wait by design. Stat, ReadLink, StatFs, Mkdir, Rmdir, Unlink,
//! Rename, Symlink, Link, Open without truncation, Close, SetAttr without a size, and a PutFile of
//! at most [`MAX_INLINE_PUT_BYTES`]; and, taken by the session layer, the lone small read of a
//! session that missed the page cache (`session::read_in_place`). Other reads, writes, listings,
//! truncations, fsyncs, checksums and batches stay on the pool (small writes and listings inline were measured too: dbench and
//! `rm -rf` of a tree were not measurably faster, and a write can wait for dirty-page throttling).
//!
//! An unlink, a rename over a file, a non-exclusive put over one and a close of a file unlinked
//! while open free the old file's blocks in the syscall: when that file is large
//! ([`INLINE_FREE_MAX_BYTES`]) they take the pool too.
//!
//! An inline operation never waits for the user's size lock ([`size_lock`]): a write on the pool
//! holds it across its disk I/O (dirty-page throttling included), so an inline unlink, rename,
//! symlink, link or put that finds it held changes nothing and is run again on the pool.
//!
//! The price: such an operation can still wait for the disk (a directory block or inode table
//! not cached, a full journal), and a runtime thread that waits serves no one else meanwhile.
//! So at most `workers - 1` requests run inline at any moment, server-wide ([`Slot`]); the rest
//! take the pool as before. On a 1-thread runtime nothing runs inline. At least one runtime
//! thread is therefore never held by a file system wait, and it keeps reading, answering and
//! timing out every connection; what is given up is at most the parallelism of the others.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::MutexGuard;

use homefs_shared::{ErrorCode, WirePath};
use rustix::fs::{FileType, Stat};

use super::OpError;
use crate::home::{Jail, QuotaLedger};

/// Requests running inline right now, server-wide.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread runs an operation inline right now ([`run_inline`]).
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` on this (runtime) thread, marked as inline for [`size_lock`].
pub(crate) fn run_inline<T>(work: impl FnOnce() -> T) -> T {
    struct Unmark;
    impl Drop for Unmark {
        fn drop(&mut self) {
            INLINE.with(|i| i.set(false));
        }
    }
    INLINE.with(|i| i.set(true));
    let _unmark = Unmark;
    work()
}

/// The user's size lock ([`QuotaLedger::size_lock`]) for an operation that may run inline. On the
/// blocking pool it waits for it. Inline it takes it only when it is free: held, it answers
/// [`OpError::Busy`] (the operation must not have changed anything yet), and [`run_short`] /
/// [`run_short_freeing`] run the operation again on the pool, where waiting holds no runtime thread.
///
/// # Errors
/// [`OpError::Busy`] inline when the lock is held.
pub fn size_lock(quota: &dyn QuotaLedger) -> Result<MutexGuard<'_, ()>, OpError> {
    if INLINE.with(Cell::get) {
        quota.try_size_lock().ok_or(OpError::Busy)
    } else {
        Ok(quota.size_lock())
    }
}

/// The most bytes of file data a `PutFile` may carry to run inline: a small file's write goes to
/// the page cache; a larger one is more likely to wait for writeback.
pub const MAX_INLINE_PUT_BYTES: usize = 64 * 1024;

/// Removing a file's last link, or closing the last descriptor of one already unlinked, frees its
/// blocks inside that syscall: for a large file milliseconds (tens of them for GiBs on ext4). Such
/// a request takes the pool, as a truncation does, when the file holds more than this.
pub const INLINE_FREE_MAX_BYTES: u64 = 16 << 20;

/// Whether dropping the last link of (or the last descriptor to) the file `st` describes would free
/// more than [`INLINE_FREE_MAX_BYTES`] of blocks: a regular file with at most one link, that large.
pub fn frees_much(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && st.st_nlink <= 1
        && (st.st_blocks as u64).saturating_mul(512) > INLINE_FREE_MAX_BYTES
}

/// Where a request that may free a file's blocks runs ([`run_short_freeing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the runtime thread: declines to free much.
    Inline,
    /// On the blocking pool: frees anything.
    Pool,
}

impl Place {
    /// Whether an operation here should leave the file `st` describes alone (answering `None`,
    /// having changed nothing) because freeing it would take long ([`frees_much`]).
    pub fn declines(self, st: &Stat) -> bool {
        self == Place::Inline && frees_much(st)
    }
}

/// Runs `work` inline when a slot is free, where it may decline (answer `None` having changed
/// nothing: it found it would free a large file, [`Place::declines`], or the size lock held,
/// [`size_lock`]); declined, or with no slot free, on the blocking pool, where it does not decline. The operation looks at what it removes
/// anyway, so the check costs nothing on the common path.
///
/// # Errors
/// Whatever `work` returns (`EIO` when it panicked on the pool, or declined there).
pub async fn run_short_freeing<T, F>(jail: &Jail, work: F) -> Result<T, OpError>
where
    F: Fn(&Jail, Place) -> Result<Option<T>, OpError> + Send + 'static,
    T: Send + 'static,
{
    if let Some(_slot) = Slot::try_take() {
        match run_inline(|| work(jail, Place::Inline)) {
            Ok(Some(done)) => return Ok(done),
            Ok(None) | Err(OpError::Busy) => {}
            Err(e) => return Err(e),
        }
    }
    jail.run(move |j| work(j, Place::Pool)?.ok_or_else(|| ErrorCode::Io.into())).await
}

/// Whether removing or replacing `path` (no last symlink followed) may free much ([`frees_much`]);
/// unknown (no such name, an error): no, the operation itself will answer.
pub fn removal_frees_much(jail: &Jail, path: &WirePath) -> bool {
    super::meta::lstat(jail, path).is_ok_and(|st| frees_much(&st))
}

/// The right to run one request on the current runtime thread; given back on drop (also when the
/// operation panics: the session answers that as an internal error).
#[derive(Debug)]
pub struct Slot(());

impl Slot {
    /// A slot if fewer than `workers - 1` requests run inline now and this is a multi-thread
    /// runtime's worker; `None` otherwise (then use the pool).
    pub fn try_take() -> Option<Slot> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        let limit = handle.metrics().num_workers().saturating_sub(1);
        IN_USE
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_USE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `work` for one short request: inline when a [`Slot`] is free, else on the blocking pool
/// through [`Jail::run`]; and on the pool too when inline it found the size lock held
/// ([`OpError::Busy`], having changed nothing: hence `FnMut`, it may run twice).
///
/// # Errors
/// Whatever `work` returns (`EIO` when it panicked on the pool).
pub async fn run_short<T, F>(jail: &Jail, mut work: F) -> Result<T, OpError>
where
    F: FnMut(&Jail) -> Result<T, OpError> + Send + 'static,
    T: Send + 'static,
{
    if let Some(_slot) = Slot::try_take() {
        match run_inline(|| work(jail)) {
            Err(OpError::Busy) => {}
            done => return done,
        }
    }
    jail.run(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots are counted process-wide: tests that need one take turns.
    static SLOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn slots_to_myself() -> std::sync::MutexGuard<'static, ()> {
        SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A jail on a fresh temporary directory (which lives as long as the returned guard).
    fn temp_jail() -> (tempfile::TempDir, Jail) {
        use rustix::fs::{Mode, OFlags};
        let tmp = tempfile::tempdir().expect("tempdir");
        let fd = rustix::fs::open(tmp.path(), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("open home");
        (tmp, Jail::new(fd))
    }

    #[test]
    fn large_files_are_freed_on_the_pool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stat = |name: &str| rustix::fs::stat(dir.path().join(name)).expect("stat");
        std::fs::write(dir.path().join("small"), vec![1u8; 64 << 10]).expect("small");
        std::fs::write(dir.path().join("large"), vec![1u8; (INLINE_FREE_MAX_BYTES + (1 << 20)) as usize])
            .expect("large");
        let sparse = std::fs::File::create(dir.path().join("sparse")).expect("sparse");
        sparse.set_len(1 << 30).expect("set_len");
        assert!(!frees_much(&stat("small")));
        assert!(frees_much(&stat("large")));
        assert!(!frees_much(&stat("sparse")), "a sparse file frees only the blocks it has");
        std::fs::hard_link(dir.path().join("large"), dir.path().join("large2")).expect("link");
        assert!(!frees_much(&stat("large")), "another link keeps the blocks");
        assert!(!frees_much(&stat(".")), "not a regular file");
    }

    /// An unlink of a large file declines inline (the file stays, nothing is released) and is
    /// done on the pool; a small one is done inline.
    #[test]
    fn a_large_unlink_is_declined_inline_and_done_on_the_pool() {
        use crate::home::{LocalLedger, QuotaLedger};
        use std::sync::Arc;
        let _slots = slots_to_myself();
        let (tmp, jail) = temp_jail();
        let large = (INLINE_FREE_MAX_BYTES + (1 << 20)) as usize;
        std::fs::write(tmp.path().join("large"), vec![1u8; large]).expect("large");
        std::fs::write(tmp.path().join("small"), b"abc").expect("small");
        let quota: Arc<dyn QuotaLedger> = Arc::new(LocalLedger::new(1 << 30, large as u64 + 3));
        let path = |n: &str| WirePath::new(n.as_bytes().to_vec()).expect("valid path");
        let declined = super::super::link::unlink(&jail, &quota, &path("large"), Place::Inline).expect("unlink");
        assert!(declined.is_none() && tmp.path().join("large").exists(), "declined, the file left alone");
        assert_eq!(quota.used(), large as u64 + 3, "nothing released");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
        rt.block_on(async {
            for name in ["large", "small"] {
                let (q, p) = (quota.clone(), path(name));
                run_short_freeing(&jail, move |j, place| super::super::link::unlink(j, &q, &p, place))
                    .await
                    .expect("unlinked");
            }
        });
        assert!(!tmp.path().join("large").exists() && !tmp.path().join("small").exists());
        assert_eq!(quota.used(), 0, "both released");
    }

    /// An inline symlink that finds the user's size lock held (a write on the pool holds it across
    /// its disk I/O) does not wait for it on the runtime thread: it changes nothing and is run
    /// again on the pool, which waits; the symlink is made and charged once.
    #[test]
    fn an_inline_operation_never_waits_for_the_size_lock() {
        use crate::home::{LocalLedger, QuotaLedger};
        use std::sync::{mpsc, Arc, Mutex};
        use std::time::{Duration, Instant};
        let _slots = slots_to_myself();
        let (tmp, jail) = temp_jail();
        let quota: Arc<dyn QuotaLedger> = Arc::new(LocalLedger::new(1 << 20, 0));
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = {
            let quota = quota.clone();
            std::thread::spawn(move || {
                let _held = quota.size_lock();
                held_tx.send(()).expect("held");
                release_rx.recv_timeout(Duration::from_secs(30)).expect("told to release");
            })
        };
        held_rx.recv_timeout(Duration::from_secs(30)).expect("the lock is held");
        // Each attempt: the thread it ran on and whether it was marked inline.
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
        let task = {
            let (jail, quota, attempts) = (jail.clone(), quota.clone(), attempts.clone());
            rt.spawn(async move {
                let path = WirePath::new(b"l".to_vec()).expect("path");
                run_short(&jail, move |j| {
                    attempts.lock().expect("attempts").push((std::thread::current().id(), INLINE.with(Cell::get)));
                    super::super::link::symlink(j, &quota, b"target", &path)
                })
                .await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while attempts.lock().expect("attempts").len() < 2 {
            assert!(Instant::now() < deadline, "no second attempt on the pool: {:?}", attempts.lock());
            std::thread::yield_now();
        }
        release_tx.send(()).expect("release");
        holder.join().expect("holder");
        rt.block_on(task).expect("joined").expect("symlink made");
        let attempts = attempts.lock().expect("attempts").clone();
        assert_eq!(attempts.len(), 2, "one inline attempt, one on the pool");
        assert!(attempts[0].1 && !attempts[1].1, "inline first, then the pool: {attempts:?}");
        assert_ne!(attempts[0].0, attempts[1].0, "the pool attempt ran on another thread");
        assert!(tmp.path().join("l").symlink_metadata().is_ok(), "made");
        assert_eq!(quota.used(), 6, "charged once");
    }

    #[test]
    fn nothing_runs_inline_outside_a_multi_thread_runtime() {
        assert!(Slot::try_take().is_none(), "no runtime");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async { assert!(Slot::try_take().is_none(), "current-thread runtime") });
    }

    #[test]
    fn at_most_workers_minus_one_slots() {
        let _slots = slots_to_myself();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(3).build().expect("runtime");
        rt.block_on(async {
            let a = Slot::try_take().expect("first");
            let b = Slot::try_take().expect("second");
            assert!(Slot::try_take().is_none(), "a third of 3 workers stays free");
            drop(a);
            let c = Slot::try_take().expect("one given back");
            drop((b, c));
        });
    }
}
