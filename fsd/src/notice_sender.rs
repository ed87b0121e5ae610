//! The change-notice stream of one subscribed session: the task that sends each coalesced batch
//! of the user's other sessions' changes as a `Changed` frame (id [`NOTICE_ID`]), and the
//! barrier a lock grant passes before it is answered.
//!
//! Lock grants are acquire barriers (PROTOCOL.md, "Change notices"): every change another
//! session had answered before this session's lock was granted is announced to this session
//! before the grant's answer. Without it, the 3 ms coalescing let a grant overtake the notice of
//! a change made under the lock just released (B unlinks a journal and unlocks; A's grant
//! arrives first, and A's cache still holds the journal). Both go through the session's one
//! writer queue, so queueing the pending notices before the answer orders them.

use bytes::Bytes;
use homefs_shared::{Response, ResponseHeader, NOTICE_ID};
use std::sync::Arc;
use tokio::sync::{mpsc, Mutex, Semaphore};
use tracing::debug;

use crate::home::notices::Notice;
use crate::home::Subscription;
use crate::session::Answer;

/// Notice frames the task may have queued for the writer and not yet written: one, so that
/// while a client does not read, changes gather (and coalesce, or overflow into `all`) in the
/// bounded inbox instead of filling the writer's queue with notices.
const NOTICES_QUEUED: usize = 1;

/// A subscribed session's notices: shared by its notice task and its lock grants.
pub struct NoticeSender {
    subscription: Subscription,
    /// Held from taking a batch to queueing it, so that a barrier never overtakes a batch the
    /// task has already taken.
    sending: Mutex<()>,
    tx: mpsc::Sender<Answer>,
}

impl NoticeSender {
    pub fn new(subscription: Subscription, tx: mpsc::Sender<Answer>) -> Arc<NoticeSender> {
        Arc::new(NoticeSender { subscription, sending: Mutex::new(()), tx })
    }

    /// The notice task: sends each batch until the writer is gone, or until aborted at the
    /// session's end (the subscription goes with the last reference).
    pub async fn run(self: Arc<Self>) {
        let queued = Arc::new(Semaphore::new(NOTICES_QUEUED));
        loop {
            // Taken before the batch: the writer gives it back once the previous frame is written.
            let Ok(slot) = queued.clone().acquire_owned().await else { return };
            self.subscription.ready().await;
            let _sending = self.sending.lock().await;
            // Empty when a barrier took it meanwhile.
            let notice = self.subscription.take();
            if !notice.is_empty() && self.send(notice, Some(slot)).await.is_err() {
                return;
            }
        }
    }

    /// Queues everything pending now, ahead of whatever the caller queues next (a lock grant).
    /// Bypasses the one-frame slot: at most one barrier per lock request, each a few frames.
    pub async fn barrier(&self) {
        let _sending = self.sending.lock().await;
        loop {
            let notice = self.subscription.take();
            if notice.is_empty() || self.send(notice, None).await.is_err() {
                return;
            }
        }
    }

    async fn send(&self, notice: Notice, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Result<(), ()> {
        let Notice { paths, all } = notice;
        debug!(paths = paths.len(), all, "change notice");
        let header = ResponseHeader { id: NOTICE_ID, result: Ok(Response::Changed { paths, all }) };
        self.tx.send((header, Bytes::new(), slot)).await.map_err(drop)
    }
}
