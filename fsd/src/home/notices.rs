//! Change notices of one user: the sessions of a user publish the paths they changed, and every
//! *other* subscribed session of that user receives them, coalesced, through a bounded inbox.
//!
//! ```text
//! session B: handle() ok --publish(B, paths)--> NoticeHub (one per UserHome)
//!                                                  |  each inbox except B's: dedup set, <= MAX_PENDING_PATHS
//!                                                  v
//! session A: notice task <--Subscription::next()-- Inbox --> Response::Changed (id 0) --> A's writer
//! ```
//! Notices are hints: an inbox that would grow past [`MAX_PENDING_PATHS`] forgets its paths and
//! says `all` instead, so a subscriber that stops reading costs a bounded amount of memory. When
//! nobody is subscribed, publishing costs one atomic load ([`NoticeHub::is_watched`]).

use homefs_shared::WirePath;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// Paths an inbox holds before it gives up on them and says `all`. A subscriber normally drains
/// its inbox within [`COALESCE`]; this many distinct paths pending means it fell behind (its
/// client stopped reading). 1024 paths are at most 4 MiB (paths are at most 4096 bytes).
pub const MAX_PENDING_PATHS: usize = 1024;

/// Paths in one `Changed` frame, at most.
pub const MAX_PATHS_PER_NOTICE: usize = 256;

/// Path bytes in one `Changed` frame, at most: like a readdir page, well under
/// `MAX_HEADER_BYTES` (256 KiB), so a frame of long paths is still a small header.
pub const MAX_NOTICE_BYTES: usize = 128 << 10;

/// How long a subscriber waits after the first pending path before it takes the batch: a burst of
/// changes (an untar, an `rm -r`) goes out in a few frames instead of one per change, while a
/// single change is still announced within milliseconds.
pub const COALESCE: Duration = Duration::from_millis(3);

/// One batch for a subscriber: the paths changed, or `all` when paths were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub paths: Vec<WirePath>,
    pub all: bool,
}

impl Notice {
    /// Nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.all
    }
}

/// The hub of one user, shared by all of the user's sessions (it lives in the `UserHome`).
#[derive(Default)]
pub struct NoticeHub {
    /// How many inboxes are in `inboxes`; read without the lock so that an unwatched publish is
    /// one load.
    watchers: AtomicUsize,
    /// The subscribed sessions' inboxes. Guards the list only; each inbox has its own lock.
    inboxes: Mutex<Vec<Arc<Inbox>>>,
}

/// What one subscribed session has not yet been sent.
struct Inbox {
    /// The subscribed session (its changes are not sent to it).
    session: u64,
    /// Wakes the subscriber when something was added (a permit is kept if it is not waiting).
    wake: Notify,
    /// Guards the pending paths, the overflow flag and the closed flag.
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Distinct paths not yet sent (at most [`MAX_PENDING_PATHS`]).
    paths: HashSet<WirePath>,
    /// Paths were dropped: the next notice says `all`.
    all: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every section below leaves the data consistent at each step: a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `from` of a change no session made (an administrator's, such as a new quota): every
/// subscribed session hears of it. Session ids count up from 1 and never reach it.
pub const NO_SESSION: u64 = u64::MAX;

impl NoticeHub {
    /// Whether any session of the user is subscribed: when not, callers skip building notices.
    pub fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Announces that session `from` changed `paths` (entries or content) to every other
    /// subscribed session of the user. Never blocks on a subscriber.
    pub fn publish(&self, from: u64, paths: &[WirePath]) {
        if paths.is_empty() || !self.is_watched() {
            return;
        }
        let inboxes = lock(&self.inboxes);
        for inbox in inboxes.iter().filter(|i| i.session != from) {
            let mut pending = lock(&inbox.pending);
            if pending.all {
                // Already told to drop everything: nothing more to remember.
                continue;
            }
            for path in paths {
                if pending.paths.len() >= MAX_PENDING_PATHS && !pending.paths.contains(path) {
                    pending.paths = HashSet::new();
                    pending.all = true;
                    break;
                }
                pending.paths.insert(path.clone());
            }
            drop(pending);
            inbox.wake.notify_one();
        }
    }

    /// Subscribes `session`: from now on it receives the other sessions' changes through the
    /// returned [`Subscription`], until that is dropped.
    pub fn subscribe(self: &Arc<Self>, session: u64) -> Subscription {
        let inbox = Arc::new(Inbox { session, wake: Notify::new(), pending: Mutex::new(Pending::default()) });
        lock(&self.inboxes).push(Arc::clone(&inbox));
        self.watchers.fetch_add(1, Ordering::Relaxed);
        Subscription { hub: Arc::clone(self), inbox }
    }

    /// How many sessions are subscribed.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

/// A session's subscription; dropping it unsubscribes (named for what dropping does).
pub struct Subscription {
    hub: Arc<NoticeHub>,
    inbox: Arc<Inbox>,
}

impl Subscription {
    /// The next batch: [`Subscription::ready`], then [`Subscription::take`]. Cancel-safe: nothing
    /// is taken before the last await.
    pub async fn next(&self) -> Notice {
        self.ready().await;
        self.take()
    }

    /// Waits until something is pending, then [`COALESCE`] more so that a burst goes out
    /// together; takes nothing (see [`Subscription::take`]). Cancel-safe.
    pub async fn ready(&self) {
        let mut waited = false;
        loop {
            {
                let pending = lock(&self.inbox.pending);
                if pending.all || !pending.paths.is_empty() {
                    break;
                }
            }
            waited = true;
            self.inbox.wake.notified().await;
        }
        if waited {
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// What is pending now, without waiting (empty when nothing is): up to
    /// [`MAX_PATHS_PER_NOTICE`] paths, or `all`.
    pub fn take(&self) -> Notice {
        let mut pending = lock(&self.inbox.pending);
        if pending.all {
            pending.all = false;
            pending.paths = HashSet::new();
            return Notice { paths: Vec::new(), all: true };
        }
        let mut bytes = 0;
        let some: Vec<WirePath> = pending
            .paths
            .iter()
            .take_while(|p| {
                bytes += p.as_bytes().len();
                bytes <= MAX_NOTICE_BYTES
            })
            .take(MAX_PATHS_PER_NOTICE)
            .cloned()
            .collect();
        if some.len() == pending.paths.len() {
            pending.paths = HashSet::new();
        } else {
            for p in &some {
                pending.paths.remove(p);
            }
        }
        Notice { paths: some, all: false }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inboxes = lock(&self.hub.inboxes);
        let before = inboxes.len();
        inboxes.retain(|i| !Arc::ptr_eq(i, &self.inbox));
        if inboxes.len() < before {
            self.hub.watchers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> WirePath {
        WirePath::new(s.as_bytes().to_vec()).expect("valid path")
    }

    #[tokio::test]
    async fn others_receive_deduplicated_paths_the_changer_does_not() {
        let hub = Arc::new(NoticeHub::default());
        assert!(!hub.is_watched());
        let a = hub.subscribe(1);
        let b = hub.subscribe(2);
        assert_eq!(hub.watchers(), 2);
        hub.publish(2, &[p("x"), p("y"), p("x")]);
        let mut got = a.next().await.paths;
        got.sort();
        assert_eq!(got, vec![p("x"), p("y")]);
        assert_eq!(b.take(), Notice { paths: vec![], all: false }, "own changes are not echoed");
        drop(a);
        drop(b);
        assert!(!hub.is_watched());
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_gets_all_then_paths_again() {
        let hub = Arc::new(NoticeHub::default());
        let a = hub.subscribe(1);
        let many: Vec<WirePath> = (0..=MAX_PENDING_PATHS).map(|i| p(&format!("f{i}"))).collect();
        hub.publish(2, &many);
        assert_eq!(a.next().await, Notice { paths: vec![], all: true });
        hub.publish(2, &[p("later")]);
        assert_eq!(a.next().await, Notice { paths: vec![p("later")], all: false });
    }

    #[test]
    fn the_largest_notice_is_a_small_header() {
        let hub = Arc::new(NoticeHub::default());
        let a = hub.subscribe(1);
        let name = "n".repeat(250);
        let long: Vec<WirePath> =
            (0..MAX_PATHS_PER_NOTICE).map(|i| p(&format!("{i:04}/{name}/{name}/{name}/{name}"))).collect();
        hub.publish(2, &long);
        let notice = a.take();
        assert!(!notice.paths.is_empty() && notice.paths.len() < MAX_PATHS_PER_NOTICE, "split by bytes");
        let header = homefs_shared::ResponseHeader {
            id: homefs_shared::NOTICE_ID,
            result: Ok(homefs_shared::Response::Changed { paths: notice.paths, all: false }),
        };
        let prefix = homefs_shared::frame::encode_prefix(&header, 0, homefs_shared::MAX_FRAME_BYTES).expect("encodes");
        assert!(prefix.len() < homefs_shared::MAX_HEADER_BYTES as usize, "{} bytes", prefix.len());
    }

    #[tokio::test]
    async fn large_batches_are_split() {
        let hub = Arc::new(NoticeHub::default());
        let a = hub.subscribe(1);
        let many: Vec<WirePath> = (0..MAX_PATHS_PER_NOTICE + 10).map(|i| p(&format!("f{i}"))).collect();
        hub.publish(2, &many);
        assert_eq!(a.next().await.paths.len(), MAX_PATHS_PER_NOTICE);
        assert_eq!(a.next().await.paths.len(), 10);
    }
}
