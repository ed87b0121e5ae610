//! Unlink-behind: `unlink` of a name the cache knows to be a non-directory, with no handle open on
//! it through this mount, is answered at once and sent in the background, in batches
//! (`Request::Remove`): `rm -rf` no longer waits a round trip per file, and the server and this
//! client handle one request per batch instead of one per file. What must not change does not:
//!
//! - **What others see of this mount**: the name is absent in the cache at once (`cache.rs`
//!   marks its directory pending). Whatever depends on the server having it waits for the
//!   pending unlinks first ([`Remote::wait_for_unlinks`]): `rmdir` of the directory, a listing or
//!   lookup of it from the server, create/mkdir/mknod/symlink/link of the same name, rename of
//!   or into it, `statfs` (df shows the freed quota), `fsyncdir`, unmount (`destroy`), and the
//!   release of a lock (fcntl/flock unlock, close): another client that takes the lock next must
//!   find the server as this mount left it (sqlite deletes its journal, then unlocks).
//! - **Errors**: a failed unlink is logged, and the name comes back: its cache entry, its
//!   directory's listing and attributes and the kernel's dentry go, so the next lookup asks the
//!   server; a later `rmdir` of the directory fails as it should (ENOTEMPTY). A lost connection
//!   is retried once (ENOENT on the retry, or ever, counts as done: the name is gone either way).
//! - **Open files**: an unlink of a file open through this mount stays synchronous, as before
//!   (the server keeps the handle's descriptor; `fstat` answers from the last attributes).
//! - **Memory**: at most [`super::cache::MAX_UNLINKS_BEHIND`] queued or in flight; past it,
//!   `unlink` waits.
//!
//! Batching ([`Outbox`]), without a timer: an unlink answered behind is queued; when no batch is
//! in flight it goes at once, else it waits for that batch's answer, and whoever gets an answer
//! sends what gathered meanwhile (at most [`MAX_BATCH`] in one request; a second batch goes
//! without waiting only when a whole one gathered). A lone unlink thus costs one round trip as
//! before, and a burst (`rm -rf`) one request per round trip.
//!
//! `rmdir` ([`Remote::rmdir_after_unlinks`]) takes its directory's unlinks still queued and sends
//! them with the rmdir last, in one `Remove`, without waiting for those already in flight (sent
//! again after them in the rare case the server ran it first and found the directory not empty):
//! the directory of an `rm -rf` costs one round trip, not one for the unlinks and one for the rmdir.
//!
//! An older server that does not know `Remove` (PROTOCOL.md, "Batched removes") gets single
//! `Unlink`s, all in flight at once, and a plain `Rmdir`, as before.

use fuser::INodeNo;
use homefs_shared::{ErrorCode, FileKind, RemoveItem, RemoveKind, WireError, WirePath};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;

use super::cache::Cached;
use super::ops::{errno, Remote, R};

/// How long a request waits for the pending unlinks it depends on (each is bounded by the
/// client's reconnect timeout; this only keeps a wedged one from holding the caller forever).
pub const WAIT_FOR_UNLINKS: Duration = Duration::from_secs(90);
/// How long an `unlink` waits for room among the unlinks in flight before it goes synchronously.
const WAIT_FOR_SLOT: Duration = Duration::from_secs(30);
/// Sends of one unlink (or batch) at most (a lost connection fails a non-idempotent request with EIO).
const ATTEMPTS: u32 = 2;
/// Batches in flight at once. A second goes only when a whole [`MAX_BATCH`] has gathered while the
/// first is in flight: sending whatever is queued as soon as anything is would, on a fast link,
/// send most unlinks alone (measured: `rm -rf` of 5,000 files on loopback sent 3,654 batches with
/// two in flight at any size), and the batches would save nothing.
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Unlinks in one `Remove`: with two batches in flight, all of [`super::cache::MAX_UNLINKS_BEHIND`].
pub const MAX_BATCH: usize = 128;

/// Whether the pending unlink of `name` in `dir` is `path` or below it (without joining them:
/// this runs over every pending unlink).
fn pending_within(dir: &WirePath, name: &[u8], path: &WirePath) -> bool {
    if path.is_root() {
        return true;
    }
    // As `WirePath::join` spells it: the root (`.`) adds nothing, a directory adds `/`.
    let (head, sep): (&[u8], &[u8]) = if dir.is_root() { (b"", b"") } else { (dir.as_bytes(), b"/") };
    let mut joined = head.iter().chain(sep).chain(name).copied();
    // `path` is a prefix of `dir/name` that ends at a component's end.
    path.as_bytes().iter().all(|b| joined.next() == Some(*b)) && matches!(joined.next(), None | Some(b'/'))
}

/// One unlink answered behind, until the server answered it: its place among the unlinks in
/// flight goes with it.
#[derive(Debug)]
struct Behind {
    parent: u64,
    name: Vec<u8>,
    path: WirePath,
    _permit: OwnedSemaphorePermit,
}

/// Unlinks answered behind and not yet sent, and how many batches are in flight.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Guards `queued` and `in_flight` together: an unlink queued while `in_flight` is at its
    /// bound is sent by one of the batches in flight when it is answered.
    state: Mutex<OutboxState>,
}

#[derive(Debug, Default)]
struct OutboxState {
    queued: VecDeque<Behind>,
    in_flight: usize,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // A panic while holding this lock leaves the queue consistent (push/drain only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `b`; returns a batch to send now (and counts it in flight) when none is in flight,
    /// or a whole [`MAX_BATCH`] gathered and fewer than [`MAX_BATCHES_IN_FLIGHT`] are.
    fn push(&self, b: Behind) -> Option<Vec<Behind>> {
        let mut s = self.lock();
        s.queued.push_back(b);
        let full = s.queued.len() >= MAX_BATCH && s.in_flight < MAX_BATCHES_IN_FLIGHT;
        if s.in_flight > 0 && !full {
            return None;
        }
        s.in_flight += 1;
        Some(Self::take_batch(&mut s))
    }

    /// After a batch was answered: the next one to send, or `None` (and one fewer in flight)
    /// when nothing is queued.
    fn next(&self) -> Option<Vec<Behind>> {
        let mut s = self.lock();
        if s.queued.is_empty() {
            s.in_flight -= 1;
            return None;
        }
        Some(Self::take_batch(&mut s))
    }

    fn take_batch(s: &mut OutboxState) -> Vec<Behind> {
        let n = s.queued.len().min(MAX_BATCH);
        s.queued.drain(..n).collect()
    }

    /// Takes the queued unlinks at or below `dir` (an rmdir sends them itself).
    fn take_within(&self, dir: &WirePath) -> Vec<Behind> {
        let mut s = self.lock();
        if s.queued.is_empty() {
            return Vec::new();
        }
        let (mine, rest): (VecDeque<Behind>, VecDeque<Behind>) =
            std::mem::take(&mut s.queued).into_iter().partition(|b| is_within(&b.path, dir));
        s.queued = rest;
        mine.into()
    }
}

/// Whether `path` is `dir` or below it.
fn is_within(path: &WirePath, dir: &WirePath) -> bool {
    if dir.is_root() {
        return true;
    }
    let (p, d) = (path.as_bytes(), dir.as_bytes());
    p.starts_with(d) && (p.len() == d.len() || p[d.len()] == b'/')
}

impl Remote {
    /// `unlink`: answered behind when it may be (see the module doc), else as before.
    pub async fn unlink(self: &Arc<Self>, parent: u64, name: &[u8]) -> R<()> {
        let path = self.child(parent, name)?;
        // A file created behind and still open is stored and its handle opened on the server
        // first (it is open, so this unlink is synchronous).
        self.keep_open_within(&path).await?;
        // An earlier unlink of this very name answered behind goes first.
        if self.cache.unlink_pending_at(&path) {
            if let Some((dir, leaf)) = path.split_last() {
                self.wait_for_unlinks(|d, n| n == leaf && *d == dir).await;
            }
        }
        if let Some(ino) = self.may_unlink_behind(&path) {
            if let Ok(Ok(permit)) =
                tokio::time::timeout(WAIT_FOR_SLOT, self.cache.unlink_slots.clone().acquire_owned()).await
            {
                self.start_behind(&Handle::current(), parent, name, (ino, path), permit);
                return Ok(());
            }
        }
        let result = self.client.unlink(&path).await;
        self.dir_touched(parent);
        if let Err(e) = result {
            self.cache.invalidate(&path);
            return Err(errno(&e));
        }
        self.cache.put_absent(&path, None);
        self.inodes.unlinked(&path);
        Ok(())
    }

    /// `unlink` answered behind without waiting for anything (on a FUSE thread): true if it
    /// was; false when it must go through [`Remote::unlink`] (not eligible, the same name still
    /// pending, or no room).
    pub fn try_unlink_behind(self: &Arc<Self>, rt: &Handle, parent: u64, name: &[u8]) -> bool {
        let Ok(path) = self.child(parent, name) else { return false };
        if self.cache.unlink_pending_at(&path) {
            return false;
        }
        let Some(ino) = self.may_unlink_behind(&path) else { return false };
        let Ok(permit) = self.cache.unlink_slots.clone().try_acquire_owned() else { return false };
        self.start_behind(rt, parent, name, (ino, path), permit);
        true
    }

    /// Records the unlink of `path` as done here and queues it (sending a batch at once when
    /// [`Outbox::push`] says so).
    fn start_behind(
        self: &Arc<Self>,
        rt: &Handle,
        parent: u64,
        name: &[u8],
        (ino, path): (u64, WirePath),
        permit: OwnedSemaphorePermit,
    ) {
        self.cache.unlink_started(&path);
        self.dir_touched(parent);
        self.inodes.unlinked_ino(ino, &path);
        self.hits.unlink_behind.fetch_add(1, Ordering::Relaxed);
        let behind = Behind { parent, name: name.to_vec(), path, _permit: permit };
        if let Some(batch) = self.cache.outbox.push(behind) {
            let me = self.clone();
            rt.spawn(async move {
                let mut batch = batch;
                loop {
                    me.send_unlinks(batch).await;
                    match me.cache.outbox.next() {
                        Some(next) => batch = next,
                        None => break,
                    }
                }
            });
        }
    }

    /// The FUSE inode of `path` if the cache knows it as a non-directory with no handle open on
    /// it here and no write queued: then its unlink may be answered behind.
    fn may_unlink_behind(&self, path: &WirePath) -> Option<u64> {
        match self.cache.get(path) {
            Some(Cached::Present(a)) if a.kind != FileKind::Dir => {
                let ino = self.inodes.fuse_ino(a.ino);
                // A file created behind may still be open through its provisional inode.
                let inos = [Some(ino), self.inodes.shadow_of(a.ino)];
                let busy = inos.iter().flatten().any(|i| self.handles.is_file_open(*i) || self.writes.pending(*i));
                (!busy).then_some(ino)
            }
            _ => None,
        }
    }

    /// Sends a batch of unlinks answered already (one `Remove`, or single `Unlink`s to an older
    /// server), and settles each in the caches.
    async fn send_unlinks(&self, batch: Vec<Behind>) {
        if !self.client.has_remove() {
            return self.send_singly(batch).await;
        }
        let items = batch.iter().map(|b| RemoveItem { path: b.path.clone(), kind: RemoveKind::File }).collect();
        match self.remove_retried(items).await {
            Ok((results, _)) => {
                for (b, r) in batch.into_iter().zip(results) {
                    self.unlink_settled(b, r);
                }
            }
            Err(_) if !self.client.has_remove() => self.send_singly(batch).await,
            Err(e) => {
                for b in batch {
                    self.unlink_settled(b, Err(e.clone()));
                }
            }
        }
    }

    /// `Remove` of `items`, sent again once after a lost connection. Returns the results and
    /// whether they came from a second send (an item already removed by the first then answers
    /// `NotFound`).
    async fn remove_retried(&self, items: Vec<RemoveItem>) -> Result<(Vec<Result<(), WireError>>, bool), WireError> {
        match self.client.remove_sent(items.clone()).await {
            // One more send (ATTEMPTS in all), unless the client found an older server.
            Err(e) if e.code == ErrorCode::Io && self.client.has_remove() => {
                self.client.remove_sent(items).await.map(|(r, _)| (r, true))
            }
            other => other,
        }
    }

    /// Single `Unlink`s, all in flight at once (an older server).
    async fn send_singly(&self, batch: Vec<Behind>) {
        let sends = batch.into_iter().map(|b| async move {
            let mut result = self.client.unlink(&b.path).await;
            for _ in 1..ATTEMPTS {
                match &result {
                    Err(e) if e.code == ErrorCode::Io => result = self.client.unlink(&b.path).await,
                    _ => break,
                }
            }
            self.unlink_settled(b, result);
        });
        futures::future::join_all(sends).await;
    }

    /// The server's answer to an unlink answered behind: done (or already gone), or failed, and
    /// then its name comes back.
    fn unlink_settled(&self, b: Behind, result: Result<(), WireError>) {
        match result {
            Ok(()) => self.cache.unlink_answered(&b.path, true),
            Err(e) if e.code == ErrorCode::NotFound => {
                tracing::debug!(path = %b.path, "unlink answered behind: already gone");
                self.cache.unlink_answered(&b.path, true);
            }
            Err(e) => {
                tracing::warn!(path = %b.path, error = %e, errno = ?errno(&e), "an unlink answered behind failed; the name is back");
                self.cache.unlink_answered(&b.path, false);
                self.forget_in_kernel(b.parent, &b.name);
            }
        }
    }

    /// `rmdir` of `path` on the server, with its unlinks still queued in the same `Remove` (the
    /// rmdir last; its result is the answer). Its unlinks already in flight are not waited for:
    /// the server has them first and most often runs them first, but it runs the requests of a
    /// session in no set order, so when the rmdir finds the directory not empty while some were
    /// in flight, it is sent once more after their answers.
    ///
    /// # Errors
    /// The rmdir's: `NotEmpty` when a file of it is still there (an unlink of it failed, or
    /// another client made one), or the connection's.
    pub async fn rmdir_after_unlinks(&self, path: &WirePath) -> Result<(), WireError> {
        let taken = self.cache.outbox.take_within(path);
        let mut held: HashMap<WirePath, HashSet<Vec<u8>>> = HashMap::new();
        for b in &taken {
            if let Some((dir, name)) = b.path.split_last() {
                held.entry(dir).or_default().insert(name.to_vec());
            }
        }
        let others =
            |d: &WirePath, n: &[u8]| pending_within(d, n, path) && !held.get(d).is_some_and(|names| names.contains(n));
        if !self.client.has_remove() {
            self.wait_for_unlinks(others).await;
            self.send_singly(taken).await;
            return self.client.rmdir(path).await;
        }
        let in_flight = self.cache.unlinks_pending(others);
        match self.rmdir_with(taken, path).await {
            Err(e) if e.code == ErrorCode::NotEmpty && in_flight => {
                tracing::debug!(path = %path, "rmdir ran before its unlinks in flight: sent again after them");
                self.wait_for_unlinks_within(path).await;
                self.client.rmdir(path).await
            }
            other => other,
        }
    }

    /// `rmdir` of `path` after the unlinks `taken` in one `Remove` (a plain `Rmdir` when there
    /// are none); to a server that refuses `Remove`, single unlinks and then the rmdir.
    async fn rmdir_with(&self, taken: Vec<Behind>, path: &WirePath) -> Result<(), WireError> {
        if taken.is_empty() {
            return self.client.rmdir(path).await;
        }
        let mut items: Vec<RemoveItem> =
            taken.iter().map(|b| RemoveItem { path: b.path.clone(), kind: RemoveKind::File }).collect();
        items.push(RemoveItem { path: path.clone(), kind: RemoveKind::Dir });
        match self.remove_retried(items).await {
            Ok((mut results, again)) => {
                let removed = results.pop().unwrap_or_else(|| Err(WireError::new(ErrorCode::Protocol, "no result")));
                for (b, r) in taken.into_iter().zip(results) {
                    self.unlink_settled(b, r);
                }
                match removed {
                    // Sent twice: the first send may have removed it.
                    Err(e) if again && e.code == ErrorCode::NotFound => Ok(()),
                    other => other,
                }
            }
            Err(_) if !self.client.has_remove() => {
                self.send_singly(taken).await;
                self.wait_for_unlinks_within(path).await;
                self.client.rmdir(path).await
            }
            Err(e) => {
                for b in taken {
                    self.unlink_settled(b, Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// The kernel's dentry of `name` in `parent` (negative since the unlink) and the parent's
    /// attributes go. On the blocking pool, not awaited: the kernel may wait for the parent's
    /// lock, held by a request that is itself waiting for this unlink.
    fn forget_in_kernel(&self, parent: u64, name: &[u8]) {
        let Some(notifier) = self.notifier.get().cloned() else { return };
        let name = name.to_vec();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)) {
                tracing::debug!(parent, error = %e, "inval_entry after a failed unlink");
            }
            let _ = notifier.inval_inode(INodeNo(parent), -1, 0);
        });
    }

    /// Waits (bounded by [`WAIT_FOR_UNLINKS`]) until no unlink answered behind is pending on a
    /// path for which `which(dir, name)`.
    pub async fn wait_for_unlinks(&self, which: impl Fn(&WirePath, &[u8]) -> bool) {
        if !self.cache.unlinks_pending(&which) {
            return;
        }
        if !self.cache.wait_for_unlinks(WAIT_FOR_UNLINKS, which).await {
            tracing::warn!(bound = ?WAIT_FOR_UNLINKS, "gave up waiting for unlinks answered behind");
        }
    }

    /// Waits for the pending unlinks of names in `dir`.
    pub async fn wait_for_unlinks_in(&self, dir: &WirePath) {
        self.wait_for_unlinks(|d, _| d == dir).await;
    }

    /// Waits for the pending unlinks at or below `path` (a name made, removed or renamed).
    pub async fn wait_for_unlinks_within(&self, path: &WirePath) {
        self.wait_for_unlinks(|d, n| pending_within(d, n, path)).await;
    }

    /// Waits for every pending unlink (`statfs`, unmount).
    pub async fn wait_for_all_unlinks(&self) {
        self.wait_for_unlinks(|_, _| true).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_means_the_path_or_below() {
        let p = |s: &str| WirePath::new(s).unwrap();
        assert!(pending_within(&p("d"), b"f", &p("d/f")));
        assert!(pending_within(&p("d/e"), b"f", &p("d")));
        assert!(!pending_within(&p("d"), b"fg", &p("d/f")));
        assert!(!pending_within(&p("dx"), b"f", &p("d")));
        assert!(pending_within(&WirePath::root(), b"f", &WirePath::root()));
        assert!(pending_within(&WirePath::root(), b"f", &p("f")));
        assert!(!pending_within(&WirePath::root(), b"f", &p("g")));
        assert!(!pending_within(&p("d"), b"f", &p("d/f/g")));
        assert!(pending_within(&p("a/b"), b"c", &p("a/b/c")));
        assert!(!pending_within(&p("a/b"), b"c", &p("a/bc")));
    }
}
