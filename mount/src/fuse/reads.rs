//! Small reads answered on the FUSE thread that received them, one thread hop less each way.
//!
//! A 4 KiB random read (`fio` psync, queue depth 1) waits for one round trip, and a spawned task
//! adds two wake-ups of another thread to it: FUSE thread -> tokio worker for the request, and
//! the worker that got the answer -> the task's worker for the reply. Here the FUSE thread drives
//! the read itself (`Handle::block_on`): it writes the request frame (the connection's writer is
//! usually idle, see `client/mux.rs`), the reader task wakes this thread with the answer, and
//! this thread replies to the kernel.
//!
//! Only when it cannot hold the FUSE threads up for long: a small read ([`INLINE_READ_MAX`]),
//! no write queued on the inode (the read would have to wait for it), the connection up (no wait
//! for a reconnect), and at most [`INLINE_READERS`] FUSE threads at a time in here, so others stay
//! free for the rest of the kernel's requests. Everything else takes the usual spawned path.

use fuser::ReplyData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

use super::ops::Remote;

/// The largest read answered inline: past it, the transfer, not the hops, is the cost, and
/// large reads come from readahead, many at once, where the runtime's concurrency helps.
pub const INLINE_READ_MAX: u32 = 64 << 10;
/// FUSE threads that may wait in an inline read at once (of `session::FUSE_THREADS`).
pub const INLINE_READERS: usize = 2;

static INLINE_NOW: AtomicUsize = AtomicUsize::new(0);

/// Holds one of the [`INLINE_READERS`] places while a read runs inline.
struct Place;

impl Place {
    fn take() -> Option<Place> {
        INLINE_NOW
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < INLINE_READERS).then_some(n + 1))
            .ok()
            .map(|_| Place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        INLINE_NOW.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers the READ here when it qualifies (see the module doc) and returns `None`; otherwise
/// gives the reply back for the spawned path. Call from a FUSE callback only (never from a
/// runtime thread: `block_on` would panic there).
///
/// The one-line call at the top of `HomeFs::read`:
/// `let Some(reply) = super::reads::inline(&self.remote, &self.rt, ino.0, fh.0, offset, size, reply) else { return };`
pub fn inline(
    remote: &Arc<Remote>,
    rt: &Handle,
    ino: u64,
    fh: u64,
    offset: u64,
    size: u32,
    reply: ReplyData,
) -> Option<ReplyData> {
    if size > INLINE_READ_MAX || remote.writes.pending(ino) || !remote.client.is_connected() {
        return Some(reply);
    }
    let Some(_place) = Place::take() else { return Some(reply) };
    // A runtime thread must not block; FUSE threads are not runtime threads, but say so plainly
    // rather than panic if that ever changes.
    if Handle::try_current().is_ok() {
        return Some(reply);
    }
    match rt.block_on(remote.read(fh, offset, size)) {
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(e),
    }
    None
}
