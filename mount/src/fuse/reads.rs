//! Small reads sent by the FUSE thread that received them and answered by the connection's
//! reader: no thread hop but the network's.
//!
//! A 4 KiB random read (`fio` psync, queue depth 1) waits for one round trip, and a spawned task
//! adds two wake-ups of another thread to it: FUSE thread -> tokio worker for the request, and
//! the worker that got the answer -> the task's worker for the reply; a FUSE thread waiting for
//! the answer itself still costs the second. Here the FUSE thread writes the request frame
//! (`Handle::block_on`; the connection's writer is usually idle, see `client/mux.rs`) and goes
//! back to the kernel; the reader task that receives the answer writes the reply to the kernel
//! itself (`Client::read_detached`). A read that cannot go out at once that way (no connection,
//! a handle to reopen, a full pipeline) and one whose connection dies go the usual way on a task,
//! so the retries, timeouts and errors (EIO, never a short read) are the usual ones.
//!
//! Only small reads ([`INLINE_READ_MAX`]), with no write queued on the inode (the read would
//! have to wait for it), and at most [`INLINE_READERS`] FUSE threads at a time in here (writing a
//! frame can wait for room in the socket), so others stay free for the rest of the kernel's
//! requests. Everything else takes the usual spawned path.

use fuser::ReplyData;
use homefs_shared::Fh;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

use super::ops::{errno, Remote};

/// The largest read answered inline: past it, the transfer, not the hops, is the cost, and
/// large reads come from readahead, many at once, where the runtime's concurrency helps.
pub const INLINE_READ_MAX: u32 = 64 << 10;
/// FUSE threads that may be sending an inline read at once (of `session::FUSE_THREADS`).
pub const INLINE_READERS: usize = 2;

static INLINE_NOW: AtomicUsize = AtomicUsize::new(0);

/// Holds one of the [`INLINE_READERS`] places while a read is sent inline.
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

/// Sends the READ from here when it qualifies (see the module doc) and returns `None`: the reply
/// is then answered by whoever gets the answer. Otherwise gives the reply back for the spawned
/// path. Call from a FUSE callback only (never from a
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
    let done = Box::new(move |answer: Result<(bytes::Bytes, u64), homefs_shared::WireError>| match answer {
        Ok((data, _size)) => reply.data(&data),
        Err(e) => reply.error(errno(&e)),
    });
    rt.block_on(remote.client.read_detached(Fh(fh), offset, size, done));
    None
}
