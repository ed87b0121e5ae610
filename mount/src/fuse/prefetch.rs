//! Which directory listings are being fetched right now (read-ahead, or a lookup that fetches its
//! directory), so that a second asker waits for the one fetch instead of sending its own, and how
//! many read-ahead fetches may be in flight at once.

use homefs_shared::WirePath;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// Read-ahead listings in flight at once, per mount.
pub const READ_AHEAD_IN_FLIGHT: usize = 8;
/// Subdirectories read ahead per listing.
pub const READ_AHEAD_DIRS: usize = 32;
/// The most entries a read-ahead or lookup fetch asks for: a bigger directory is left alone.
pub const LISTING_PAGE: u32 = 1024;
/// How long an asker waits for a fetch in flight before fetching on its own.
pub const WAIT_FOR_FETCH: Duration = Duration::from_secs(5);
/// Directories remembered as too big to fetch whole for a lookup (forgotten all at once beyond).
const MAX_BIG: usize = 1024;

/// Listings in flight, and directories known to be more than one page.
#[derive(Debug)]
pub struct Prefetch {
    in_flight: Mutex<HashSet<WirePath>>,
    big: Mutex<HashSet<WirePath>>,
    done: Notify,
    /// Permits for read-ahead fetches.
    pub slots: Arc<Semaphore>,
}

impl Default for Prefetch {
    fn default() -> Prefetch {
        Prefetch {
            in_flight: Mutex::default(),
            big: Mutex::default(),
            done: Notify::new(),
            slots: Arc::new(Semaphore::new(READ_AHEAD_IN_FLIGHT)),
        }
    }
}

impl Prefetch {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<WirePath>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `dir` as being fetched by the caller; false if someone already is.
    pub fn claim(&self, dir: &WirePath) -> bool {
        self.set().insert(dir.clone())
    }

    /// The caller's fetch of `dir` ended (stored or not): wakes those waiting.
    pub fn release(&self, dir: &WirePath) {
        self.set().remove(dir);
        self.done.notify_waiters();
    }

    /// Waits (at most [`WAIT_FOR_FETCH`]) while a fetch of `dir` is in flight.
    pub async fn wait(&self, dir: &WirePath) {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_FETCH;
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.set().contains(dir) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// `dir` has more than one page of entries: lookups in it stat the one name.
    pub fn mark_big(&self, dir: &WirePath) {
        let mut big = self.big.lock().unwrap_or_else(|p| p.into_inner());
        if big.len() >= MAX_BIG {
            big.clear();
        }
        big.insert(dir.clone());
    }

    pub fn is_big(&self, dir: &WirePath) -> bool {
        self.big.lock().unwrap_or_else(|p| p.into_inner()).contains(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_fetch_ends() {
        let p = Arc::new(Prefetch::default());
        let d = WirePath::root().join(b"d").expect("path");
        assert!(p.claim(&d));
        assert!(!p.claim(&d));
        let q = p.clone();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            q.wait(&d2).await;
            start.elapsed()
        });
        tokio::task::yield_now().await;
        p.release(&d);
        let waited = waiter.await.expect("waiter");
        assert!(waited < WAIT_FOR_FETCH, "waited the whole bound: {waited:?}");
        assert!(p.claim(&d));
    }
}
