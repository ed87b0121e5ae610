//! How far this mount has applied the server's change notices, so that a lock grant can wait
//! for them: fsd queues every notice pending for the connection ahead of a lock grant
//! (PROTOCOL.md, "Lock grants are barriers"), and the connection's reader hands notices on in
//! the order they arrive, so the notices counted as received when a grant is answered include
//! every change the previous holder made under the lock. Once those are applied (cache entries
//! and kernel entries dropped by the notice thread), whatever runs under the lock sees them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Counts of notices queued for the notice thread and applied by it.
#[derive(Debug, Default)]
pub struct NoticesApplied {
    received: AtomicU64,
    applied: AtomicU64,
    progress: Notify,
}

impl NoticesApplied {
    /// A notice was queued for the notice thread (called by the connection's reader).
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// The notice thread applied `n` more notices (a lost one counts as applied once the
    /// thread has dropped everything for it).
    pub fn applied(&self, n: u64) {
        self.applied.fetch_add(n, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    /// Waits (at most `bound`) until every notice received before the call is applied. Returns
    /// false if it gave up.
    pub fn wait(&self, bound: Duration) -> impl Future<Output = bool> + '_ {
        let target = self.received.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + bound;
        async move { self.wait_for(target, deadline).await }
    }

    async fn wait_for(&self, target: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.applied.load(Ordering::Acquire) >= target {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_what_was_received_before_not_after() {
        let n = NoticesApplied::default();
        assert!(n.wait(Duration::from_millis(1)).await, "nothing received: nothing to wait for");
        n.received();
        n.received();
        assert!(!n.wait(Duration::from_millis(20)).await, "two received, none applied");
        let waiting = n.wait(Duration::from_secs(10));
        n.applied(1);
        n.applied(1);
        // Received after the call: not part of what it waits for.
        n.received();
        assert!(waiting.await, "both applied");
    }
}
