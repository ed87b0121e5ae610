//! Usage figures (`statfs`: `df`, and GNU find's one `fstatfs` per walk) answered from the last
//! `StatFs` answer while nothing can have moved them, so a quiet mount answers with no round trip.
//!
//! - **Fresh**: the last answer was asked after every change this mount knows of, on the
//!   connection that is up now (a server restart or an outage may have moved anything), and is
//!   younger than the cache TTL (60 s with change notices, as for metadata: the bound on what no
//!   notice reports, such as another user filling the disk or files changed on the server's disk;
//!   a new quota set with `fsd user quota` is announced; zero TTL: every `statfs` asks). A stale
//!   one is never answered: the `statfs` asks, as before.
//! - **Stale**: every change that can move usage bumps a generation once it is visible to the
//!   server (or queued for it): this mount's writes, creates, stores of files created behind,
//!   truncates, unlinks, rmdirs, renames, links, copies, the close of a file unlinked while open
//!   (`fs.rs`, `creates.rs`), and every change notice (another mount, netcp: `notices.rs`). An
//!   answer counts as fresh only at the generation read before it was asked; before asking, the
//!   queued writes of files written since the last ask are settled and the unlinks answered
//!   behind are awaited, so `df` right after `cp` or `rm` shows the new figures.
//! - **Refreshed behind**: once a `statfs` was asked on this mount (someone watches usage), a
//!   stale value is asked again in the background [`SETTLE`] after the last change, so the next
//!   `statfs` usually finds it fresh. One ask in flight at most (background or not): a `statfs`
//!   that finds one in flight waits for it (bounded by [`WAIT_FOR_ASK`]) rather than sending its
//!   own. A mount nobody asks about costs nothing.

use homefs_shared::StatFs;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

use super::ops::{errno, Remote, R};

/// How long after the last change the background refresh asks (a burst of changes, `cp -r` or
/// `rm -rf`, costs one ask after it, not one per change).
pub const SETTLE: Duration = Duration::from_millis(250);
/// How long a `statfs` waits for an ask in flight before it sends its own (each ask is bounded by
/// the client's timeouts and the wait for unlinks; this only keeps a wedged one from holding it).
pub const WAIT_FOR_ASK: Duration = Duration::from_secs(30);
/// The files written since the last ask that are remembered (their queued writes are settled
/// before the next ask); past it, the next ask's answer is not kept (see [`Written`]).
const MAX_WRITTEN: usize = 4096;

/// An answer and when it was asked.
#[derive(Clone, Copy)]
struct Known {
    figures: StatFs,
    /// The generation read before asking: fresh while it is still the current one.
    generation: u64,
    /// The connection it was asked on (the client's reconnect count): a server restart or an
    /// outage may have moved anything, and no notice covers the time between.
    connection: u64,
    asked: Instant,
}

/// Files with writes queued since the last ask began.
#[derive(Default)]
struct Written {
    inos: HashSet<u64>,
    /// More than [`MAX_WRITTEN`] files: some are not in `inos`, so an ask cannot settle them all
    /// and its answer is given but not kept.
    overflow: bool,
}

/// The usage figures of one mount (see the module doc).
pub struct Usage {
    /// Bumped by every change that can move usage.
    generation: AtomicU64,
    /// The last answer; held only to read or replace it.
    last: Mutex<Option<Known>>,
    /// Held only to add or take files.
    written: Mutex<Written>,
    /// Held across an ask: one in flight at most.
    asking: tokio::sync::Mutex<()>,
    /// Set by the first `statfs`: the mount and the runtime the background refresh runs on.
    watcher: OnceLock<(Weak<Remote>, Handle)>,
    /// A background refresh is waiting for changes to settle.
    scheduled: AtomicBool,
    /// When the last change was made, in nanoseconds since `born`.
    last_change: AtomicU64,
    born: Instant,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            generation: AtomicU64::new(0),
            last: Mutex::new(None),
            written: Mutex::new(Written::default()),
            asking: tokio::sync::Mutex::new(()),
            watcher: OnceLock::new(),
            scheduled: AtomicBool::new(false),
            last_change: AtomicU64::new(0),
            born: Instant::now(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: recover from a poisoned lock rather than fail every later call.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Usage {
    /// Something that can move usage happened (and the server has it, or has it queued): the
    /// figures are stale, and refreshed behind once changes settle.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let now = self.born.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last_change.store(now, Ordering::Release);
        let Some((remote, rt)) = self.watcher.get() else { return };
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            rt.spawn(refresh_when_settled(remote.clone()));
        }
    }

    /// A write on `ino` was queued or done: as [`Usage::changed`], and the next ask settles the
    /// file's queued writes first.
    pub fn wrote(&self, ino: u64) {
        {
            let mut w = lock(&self.written);
            if w.inos.len() < MAX_WRITTEN {
                w.inos.insert(ino);
            } else if !w.inos.contains(&ino) {
                w.overflow = true;
            }
        }
        self.changed();
    }

    /// The figures, if fresh for `max_age` on `connection` (`None`: no connection now, so
    /// nothing is fresh).
    pub fn fresh(&self, max_age: Duration, connection: Option<u64>) -> Option<StatFs> {
        let known = (*lock(&self.last))?;
        let current = known.generation == self.generation.load(Ordering::Acquire);
        let same_connection = connection == Some(known.connection);
        (current && same_connection && known.asked.elapsed() < max_age).then_some(known.figures)
    }

    /// From now on, changes are refreshed behind (the first `statfs` calls this).
    pub fn watch(&self, remote: &Arc<Remote>, rt: &Handle) {
        if self.watcher.get().is_none() {
            let _ = self.watcher.set((Arc::downgrade(remote), rt.clone()));
        }
    }

    fn since_last_change(&self) -> Duration {
        let at = Duration::from_nanos(self.last_change.load(Ordering::Acquire));
        self.born.elapsed().saturating_sub(at)
    }

    /// Keeps an answer asked at `generation`, unless a newer one is kept already.
    fn remember(&self, figures: StatFs, generation: u64, connection: u64, asked: Instant) {
        let mut last = lock(&self.last);
        if last.is_none_or(|k| k.generation <= generation) {
            *last = Some(Known { figures, generation, connection, asked });
        }
    }
}

/// The background refresh: waits until no change came for [`SETTLE`], then asks once, unless a
/// `statfs` asked meanwhile. Holds no reference to the mount while it sleeps.
async fn refresh_when_settled(remote: Weak<Remote>) {
    loop {
        let quiet = match remote.upgrade() {
            Some(r) => r.usage.since_last_change(),
            None => return,
        };
        if quiet >= SETTLE {
            break;
        }
        tokio::time::sleep(SETTLE - quiet).await;
    }
    let Some(r) = remote.upgrade() else { return };
    // A change from here on schedules the next refresh.
    r.usage.scheduled.store(false, Ordering::Release);
    if r.usage_cached().is_none() {
        if let Err(e) = r.ask_usage().await {
            tracing::debug!(error = ?e, "background usage refresh failed");
        }
    }
}

impl Remote {
    /// `statfs` answered on the caller's thread, when the figures are fresh (asked on the connection
    /// that is up now).
    pub fn usage_cached(&self) -> Option<StatFs> {
        self.usage.fresh(self.cache.ttl(), self.connection())
    }

    /// The current connection (the client's reconnect count), if one is up.
    fn connection(&self) -> Option<u64> {
        self.client.is_connected().then(|| self.client.reconnects())
    }

    /// `statfs`: the fresh figures, else asked (after the writes and unlinks they must show).
    pub async fn usage_figures(&self) -> R<StatFs> {
        match self.usage_cached() {
            Some(figures) => Ok(figures),
            None => self.ask_usage().await,
        }
    }

    /// Asks the server, one ask in flight at most; an answer that came while waiting for the
    /// one in flight is taken if fresh.
    async fn ask_usage(&self) -> R<StatFs> {
        let usage = &self.usage;
        let _one = tokio::time::timeout(WAIT_FOR_ASK, usage.asking.lock()).await.ok();
        if let Some(figures) = self.usage_cached() {
            return Ok(figures);
        }
        let generation = usage.generation.load(Ordering::Acquire);
        let connection = self.client.reconnects();
        let written = std::mem::take(&mut *lock(&usage.written));
        for ino in written.inos {
            self.writes.settle(ino).await;
        }
        // `df` shows the space freed by unlinks answered behind.
        self.wait_for_all_unlinks().await;
        let asked = Instant::now();
        let figures = self.client.statfs().await.map_err(|e| errno(&e))?;
        if !written.overflow {
            usage.remember(figures, generation, connection, asked);
        }
        Ok(figures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(used: u64) -> StatFs {
        StatFs { total_bytes: 1 << 30, used_bytes: used, free_bytes: (1 << 30) - used, block_size: 4096, max_name: 255 }
    }

    #[test]
    fn an_answer_is_fresh_until_a_change_or_its_age() {
        let u = Usage::default();
        assert!(u.fresh(Duration::from_secs(60), Some(0)).is_none(), "nothing asked yet");
        let g = u.generation.load(Ordering::Acquire);
        u.remember(figures(1), g, 0, Instant::now());
        assert_eq!(u.fresh(Duration::from_secs(60), Some(0)).map(|f| f.used_bytes), Some(1));
        assert!(u.fresh(Duration::from_secs(60), Some(1)).is_none(), "asked on another connection");
        assert!(u.fresh(Duration::from_secs(60), None).is_none(), "no connection now");
        assert!(u.fresh(Duration::ZERO, Some(0)).is_none(), "older than a zero TTL");
        u.changed();
        assert!(u.fresh(Duration::from_secs(60), Some(0)).is_none(), "a change since the ask");
        // An answer asked before the change is not fresh, and does not replace a newer one.
        let g2 = u.generation.load(Ordering::Acquire);
        u.remember(figures(2), g2, 0, Instant::now());
        u.remember(figures(3), g, 0, Instant::now());
        assert_eq!(u.fresh(Duration::from_secs(60), Some(0)).map(|f| f.used_bytes), Some(2));
    }

    #[test]
    fn written_files_are_bounded() {
        let u = Usage::default();
        for ino in 0..(MAX_WRITTEN as u64 + 10) {
            u.wrote(ino);
        }
        let w = lock(&u.written);
        assert_eq!(w.inos.len(), MAX_WRITTEN);
        assert!(w.overflow);
    }
}
