//! The server-wide lock table: byte-range (`fcntl`) and whole-file (`flock`) locks, keyed by the
//! file's identity, so that locks taken through one connection hold against every other.
//!
//! As on Linux, the two families never conflict with each other. A POSIX lock's owner is
//! (session, the client's lock owner): a request replaces, splits and merges that owner's own
//! ranges. A `flock` lock's owner is (session, file handle): a new request replaces its lock.

use homefs_shared::{ErrorCode, LockKind, LockSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// How long a `Lock { wait: true }` waits before answering `WouldBlock`, so that the client
/// re-sends: a request never occupies the connection for longer than this, and a client that
/// gave up (its process was interrupted) stops waiting within this bound.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Most lock ranges held on one file, by all owners together. Each distinct range is an entry
/// that every later request on the file scans, so without a bound one client could grow the
/// table (and the cost of every check) without end by locking byte after byte; past it a
/// request that would add ranges gets `ENOLCK`, as the kernel answers when it runs out of locks.
/// Real programs (databases, editors) hold a handful per file.
pub const MAX_LOCKS_PER_FILE: usize = 1024;

/// A file's identity on the server: `(st_dev, st_ino)` of the open file.
pub type FileId = (u64, u64);

/// Who holds a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    Posix { session: u64, owner: u64 },
    Flock { session: u64, fh: u64 },
}

impl Owner {
    fn session(self) -> u64 {
        match self {
            Owner::Posix { session, .. } | Owner::Flock { session, .. } => session,
        }
    }

    fn is_flock(self) -> bool {
        matches!(self, Owner::Flock { .. })
    }
}

/// One granted lock; `kind` is never `Unlock`.
#[derive(Debug, Clone, Copy)]
struct Held {
    owner: Owner,
    kind: LockKind,
    start: u64,
    end: u64,
    /// The client's own owner value and pid, reported by `TestLock`.
    client_owner: u64,
    pid: u32,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn spec(&self) -> LockSpec {
        LockSpec {
            kind: self.kind,
            start: self.start,
            end: self.end,
            owner: self.client_owner,
            pid: self.pid,
            flock: self.owner.is_flock(),
        }
    }
}

/// The locks on one file and the waiters for them.
#[derive(Debug, Default)]
struct FileLocks {
    held: Vec<Held>,
    /// Woken (all waiters) whenever a lock on this file is released or weakened.
    wake: Arc<Notify>,
}

impl FileLocks {
    /// The first lock of another owner that conflicts with `kind` over `[start, end]`.
    fn conflict(&self, owner: Owner, kind: LockKind, start: u64, end: u64) -> Option<&Held> {
        self.held.iter().find(|h| {
            h.owner != owner
                && h.owner.is_flock() == owner.is_flock()
                && h.overlaps(start, end)
                && (h.kind == LockKind::Write || kind == LockKind::Write)
        })
    }

    /// Grants, changes or releases `owner`'s lock, or reports why not (changing nothing).
    fn apply(&mut self, owner: Owner, spec: &LockSpec) -> Result<(), Refused> {
        let (start, end) = if owner.is_flock() { (0, u64::MAX) } else { (spec.start, spec.end) };
        if spec.kind != LockKind::Unlock && self.conflict(owner, spec.kind, start, end).is_some() {
            return Err(Refused::Conflict);
        }
        // Splitting a range (even by an unlock) adds one; undone if that passes the bound.
        let before = (self.held.len() >= MAX_LOCKS_PER_FILE - 1).then(|| self.held.clone());
        // Carve [start, end] out of the owner's ranges, keeping what lies outside it.
        let mut kept = Vec::with_capacity(self.held.len() + 2);
        for h in self.held.drain(..) {
            if h.owner != owner || !h.overlaps(start, end) {
                kept.push(h);
                continue;
            }
            if h.start < start {
                kept.push(Held { end: start - 1, ..h });
            }
            if h.end > end {
                kept.push(Held { start: end + 1, ..h });
            }
        }
        self.held = kept;
        if spec.kind != LockKind::Unlock {
            // Merge with the owner's adjacent ranges of the same kind (overlaps were carved out).
            let (mut start, mut end) = (start, end);
            self.held.retain(|h| {
                let adjacent = h.owner == owner
                    && h.kind == spec.kind
                    && (h.end.checked_add(1) == Some(start) || end.checked_add(1) == Some(h.start));
                if adjacent {
                    start = start.min(h.start);
                    end = end.max(h.end);
                }
                !adjacent
            });
            self.held.push(Held { owner, kind: spec.kind, start, end, client_owner: spec.owner, pid: spec.pid });
        }
        if self.held.len() > MAX_LOCKS_PER_FILE {
            if let Some(before) = before {
                self.held = before;
                return Err(Refused::TooMany);
            }
        }
        // An unlock, a downgrade or a shrink may let a waiter in; waking them all is cheap and
        // each re-checks its own request.
        self.wake.notify_waiters();
        Ok(())
    }
}

/// Why a lock request was not applied.
enum Refused {
    /// Another owner holds a conflicting lock.
    Conflict,
    /// The file would hold more than [`MAX_LOCKS_PER_FILE`] ranges.
    TooMany,
}

/// Why one attempt did not take the lock.
enum NotTaken {
    /// Wait for this wake-up, then try again.
    Conflict(tokio::sync::futures::OwnedNotified),
    TooMany,
}

/// All locks held on this server.
#[derive(Default)]
pub struct LockTable {
    /// Locks by file; an entry is removed when its last lock goes. Held for short sections only.
    files: Mutex<HashMap<FileId, FileLocks>>,
    /// Requests waiting for a lock right now (for tests and diagnostics).
    waiting: AtomicUsize,
}

/// Counts a waiting request while it exists.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LockTable {
    fn files(&self) -> MutexGuard<'_, HashMap<FileId, FileLocks>> {
        // Every section leaves the map consistent before it could panic (apply changes `held`
        // with whole assignments), so a poisoned lock is still usable.
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes, changes or releases a lock of `session` on `file` (opened as `fh` in that session).
    /// With `wait`, waits up to [`LOCK_WAIT`] for conflicting locks to go.
    ///
    /// # Errors
    /// [`ErrorCode::WouldBlock`] when another owner holds a conflicting lock (after the wait);
    /// [`ErrorCode::NoLocks`] when the file already holds [`MAX_LOCKS_PER_FILE`] ranges.
    pub async fn lock(&self, file: FileId, session: u64, fh: u64, spec: LockSpec, wait: bool) -> Result<(), ErrorCode> {
        self.lock_within(file, session, fh, spec, if wait { LOCK_WAIT } else { Duration::ZERO }).await
    }

    /// [`LockTable::lock`] with a wait of at most `max_wait` (zero: no wait).
    async fn lock_within(
        &self,
        file: FileId,
        session: u64,
        fh: u64,
        spec: LockSpec,
        max_wait: Duration,
    ) -> Result<(), ErrorCode> {
        if spec.start > spec.end {
            return Err(ErrorCode::Invalid);
        }
        let owner = owner_of(session, fh, &spec);
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let woken = match self.try_lock(file, owner, &spec) {
                Ok(()) => return Ok(()),
                Err(NotTaken::TooMany) => return Err(ErrorCode::NoLocks),
                Err(NotTaken::Conflict(_)) if max_wait.is_zero() => return Err(ErrorCode::WouldBlock),
                Err(NotTaken::Conflict(woken)) => woken,
            };
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&self.waiting);
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Err(ErrorCode::WouldBlock);
            }
        }
    }

    /// One attempt; on a conflict, a wake-up registered before the table's lock was let go, so
    /// no release can slip between the check and the wait.
    fn try_lock(&self, file: FileId, owner: Owner, spec: &LockSpec) -> Result<(), NotTaken> {
        let mut files = self.files();
        let locks = files.entry(file).or_default();
        match locks.apply(owner, spec) {
            Ok(()) => {
                if locks.held.is_empty() {
                    files.remove(&file);
                }
                Ok(())
            }
            Err(Refused::Conflict) => Err(NotTaken::Conflict(Arc::clone(&locks.wake).notified_owned())),
            Err(Refused::TooMany) => Err(NotTaken::TooMany),
        }
    }

    /// The first lock of another owner that would conflict with `spec`, if any.
    pub fn test(&self, file: FileId, session: u64, fh: u64, spec: &LockSpec) -> Option<LockSpec> {
        let owner = owner_of(session, fh, spec);
        let (start, end) = if spec.flock { (0, u64::MAX) } else { (spec.start, spec.end) };
        let kind = if spec.kind == LockKind::Unlock { LockKind::Read } else { spec.kind };
        let files = self.files();
        files.get(&file)?.conflict(owner, kind, start, end).map(Held::spec)
    }

    /// Releases the `flock` lock that handle `fh` of `session` holds on `file` (on `Close`).
    pub fn release_flock(&self, file: FileId, session: u64, fh: u64) {
        self.release_where(Some(file), |o| o == Owner::Flock { session, fh });
    }

    /// Releases every lock `session` holds (when it ends) and wakes the waiters.
    pub fn release_session(&self, session: u64) {
        self.release_where(None, |o| o.session() == session);
    }

    fn release_where(&self, only: Option<FileId>, matches: impl Fn(Owner) -> bool) {
        let mut files = self.files();
        files.retain(|id, locks| {
            if only.is_some_and(|f| f != *id) {
                return true;
            }
            let before = locks.held.len();
            locks.held.retain(|h| !matches(h.owner));
            if locks.held.len() != before {
                locks.wake.notify_waiters();
            }
            !locks.held.is_empty()
        });
    }

    /// How many lock requests are waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// How many locks are held on `file` (for tests and diagnostics).
    pub fn held(&self, file: FileId) -> usize {
        self.files().get(&file).map_or(0, |l| l.held.len())
    }
}

fn owner_of(session: u64, fh: u64, spec: &LockSpec) -> Owner {
    if spec.flock {
        Owner::Flock { session, fh }
    } else {
        Owner::Posix { session, owner: spec.owner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: FileId = (1, 2);

    fn posix(kind: LockKind, start: u64, end: u64, owner: u64) -> LockSpec {
        LockSpec { kind, start, end, owner, pid: 100 + owner as u32, flock: false }
    }

    fn flock(kind: LockKind) -> LockSpec {
        LockSpec { kind, start: 0, end: u64::MAX, owner: 0, pid: 7, flock: true }
    }

    fn ranges(t: &LockTable, file: FileId) -> Vec<(LockKind, u64, u64)> {
        let files = t.files();
        let mut v: Vec<_> =
            files.get(&file).map_or(vec![], |l| l.held.iter().map(|h| (h.kind, h.start, h.end)).collect());
        v.sort_by_key(|r| (r.1, r.2));
        v
    }

    #[tokio::test]
    async fn read_locks_share_and_write_locks_exclude_other_sessions() {
        let t = LockTable::default();
        t.lock(F, 1, 1, posix(LockKind::Read, 0, 99, 1), false).await.expect("first read lock");
        t.lock(F, 2, 1, posix(LockKind::Read, 50, 150, 1), false).await.expect("read locks share");
        let err = t.lock(F, 2, 1, posix(LockKind::Write, 10, 20, 1), false).await;
        assert_eq!(err, Err(ErrorCode::WouldBlock));
        let c = t.test(F, 2, 1, &posix(LockKind::Write, 10, 20, 1)).expect("conflict reported");
        assert_eq!((c.kind, c.start, c.end, c.pid), (LockKind::Read, 0, 99, 101));
        assert_eq!(t.test(F, 2, 1, &posix(LockKind::Write, 151, 200, 1)), None);
        // The same owner number in another session is another owner; in the same session it is one.
        t.lock(F, 1, 9, posix(LockKind::Write, 40, 60, 1), false).await.expect_err("session 2 reads 50..");
        t.lock(F, 1, 9, posix(LockKind::Write, 0, 49, 1), false).await.expect("own read lock upgraded");
    }

    #[tokio::test]
    async fn ranges_split_and_merge() {
        let t = LockTable::default();
        t.lock(F, 1, 1, posix(LockKind::Write, 0, 99, 1), false).await.expect("lock");
        t.lock(F, 1, 1, posix(LockKind::Read, 40, 59, 1), false).await.expect("downgrade the middle");
        assert_eq!(ranges(&t, F), vec![(LockKind::Write, 0, 39), (LockKind::Read, 40, 59), (LockKind::Write, 60, 99)]);
        t.lock(F, 1, 1, posix(LockKind::Unlock, 50, 69, 1), false).await.expect("unlock");
        assert_eq!(ranges(&t, F), vec![(LockKind::Write, 0, 39), (LockKind::Read, 40, 49), (LockKind::Write, 70, 99)]);
        t.lock(F, 1, 1, posix(LockKind::Write, 40, 69, 1), false).await.expect("fill the hole");
        assert_eq!(ranges(&t, F), vec![(LockKind::Write, 0, 99)], "adjacent ranges merge");
        t.lock(F, 1, 1, posix(LockKind::Write, 100, u64::MAX, 1), false).await.expect("to EOF");
        assert_eq!(ranges(&t, F), vec![(LockKind::Write, 0, u64::MAX)]);
        t.lock(F, 1, 1, posix(LockKind::Unlock, 0, u64::MAX, 1), false).await.expect("unlock all");
        assert_eq!(t.held(F), 0);
        assert!(t.files().is_empty(), "an entry goes with its last lock");
    }

    #[tokio::test]
    async fn flock_against_flock_and_independent_of_posix() {
        let t = LockTable::default();
        t.lock(F, 1, 1, flock(LockKind::Read), false).await.expect("shared");
        t.lock(F, 1, 2, flock(LockKind::Read), false).await.expect("another handle shares");
        assert_eq!(t.lock(F, 1, 2, flock(LockKind::Write), false).await, Err(ErrorCode::WouldBlock));
        t.lock(F, 2, 1, posix(LockKind::Write, 0, u64::MAX, 1), false).await.expect("families are independent");
        t.release_flock(F, 1, 1);
        t.lock(F, 1, 2, flock(LockKind::Write), false).await.expect("upgrade once alone");
        assert_eq!(t.test(F, 1, 1, &flock(LockKind::Read)).map(|c| (c.kind, c.flock)), Some((LockKind::Write, true)));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_when_the_holder_unlocks() {
        let t = Arc::new(LockTable::default());
        t.lock(F, 1, 1, posix(LockKind::Write, 0, 9, 1), false).await.expect("holder");
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.lock(F, 2, 1, posix(LockKind::Write, 5, 5, 1), true).await })
        };
        wait_for_waiters(&t, 1).await;
        t.lock(F, 1, 1, posix(LockKind::Unlock, 0, 9, 1), false).await.expect("unlock");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("waiter woken in time");
        got.expect("task").expect("lock granted after the unlock");
        assert_eq!(t.waiting(), 0);
    }

    #[tokio::test]
    async fn session_end_releases_and_wakes() {
        let t = Arc::new(LockTable::default());
        t.lock(F, 1, 1, flock(LockKind::Write), false).await.expect("flock");
        t.lock(F, 1, 1, posix(LockKind::Read, 0, 9, 3), false).await.expect("posix");
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.lock(F, 2, 4, flock(LockKind::Write), true).await })
        };
        wait_for_waiters(&t, 1).await;
        t.release_session(1);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("waiter woken in time");
        got.expect("task").expect("granted after the session ended");
        assert_eq!(ranges(&t, F), vec![(LockKind::Write, 0, u64::MAX)], "only session 2's flock is left");
    }

    #[tokio::test]
    async fn a_wait_is_bounded() {
        let t = LockTable::default();
        t.lock(F, 1, 1, posix(LockKind::Write, 0, 0, 1), false).await.expect("holder");
        let bound = Duration::from_millis(50);
        let start = tokio::time::Instant::now();
        assert_eq!(t.lock_within(F, 2, 1, posix(LockKind::Read, 0, 0, 1), bound).await, Err(ErrorCode::WouldBlock));
        assert!(start.elapsed() >= bound, "gave up after {:?}, before its bound", start.elapsed());
        assert_eq!(t.waiting(), 0);
    }

    async fn wait_for_waiters(t: &LockTable, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while t.waiting() < n {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {n} lock waiter(s)");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn ranges_per_file_are_bounded() {
        let t = LockTable::default();
        // Every other byte: nothing merges, each lock is its own range.
        for i in 0..MAX_LOCKS_PER_FILE as u64 - 1 {
            t.lock(F, 1, 1, posix(LockKind::Read, 2 * i, 2 * i, 1), false).await.expect("within the bound");
        }
        let far = 1 << 40;
        t.lock(F, 1, 1, posix(LockKind::Read, far, far + 100, 1), false).await.expect("the last one that fits");
        assert_eq!(t.held(F), MAX_LOCKS_PER_FILE);
        let e = t.lock(F, 2, 1, posix(LockKind::Read, far + 200, far + 200, 2), false).await;
        assert_eq!(e, Err(ErrorCode::NoLocks), "a range past the bound");
        let e = t.lock(F, 1, 1, posix(LockKind::Unlock, far + 50, far + 50, 1), false).await;
        assert_eq!(e, Err(ErrorCode::NoLocks), "an unlock that splits a range past the bound");
        assert_eq!(t.held(F), MAX_LOCKS_PER_FILE, "refused requests change nothing");
        t.lock(F, 1, 1, posix(LockKind::Unlock, 0, u64::MAX, 1), false).await.expect("unlock all");
        assert_eq!(t.held(F), 0);
    }
}
