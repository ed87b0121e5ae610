//! Unlink-behind: `unlink` of a name the cache knows to be a non-directory, with no handle open on
//! it through this mount, is answered at once and sent in the background, many in flight
//! (`rm -rf` no longer waits a round trip per file). What must not change does not:
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
//!   is retried (ENOENT on the retry, or ever, counts as done: the name is gone either way).
//! - **Open files**: an unlink of a file open through this mount stays synchronous, as before
//!   (the server keeps the handle's descriptor; `fstat` answers from the last attributes).
//! - **Memory**: at most [`super::cache::MAX_UNLINKS_BEHIND`] in flight; past it, `unlink` waits.

use fuser::INodeNo;
use homefs_shared::{ErrorCode, FileKind, WirePath};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
/// Sends of one unlink at most (a lost connection fails a non-idempotent request with EIO).
const ATTEMPTS: u32 = 2;

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

    /// Records the unlink of `path` as done here and sends it in the background.
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
        let me = self.clone();
        let name = name.to_vec();
        rt.spawn(async move {
            me.unlink_in_background(parent, &name, &path).await;
            drop(permit);
        });
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

    /// The unlink answered already: sent, retried once if the connection was lost, and its
    /// failure undone in the caches.
    async fn unlink_in_background(&self, parent: u64, name: &[u8], path: &WirePath) {
        let mut result = self.client.unlink(path).await;
        for _ in 1..ATTEMPTS {
            match &result {
                Err(e) if e.code == ErrorCode::Io => result = self.client.unlink(path).await,
                _ => break,
            }
        }
        match result {
            Ok(()) => self.cache.unlink_answered(path, true),
            Err(e) if e.code == ErrorCode::NotFound => {
                tracing::debug!(path = %path, "unlink answered behind: already gone");
                self.cache.unlink_answered(path, true);
            }
            Err(e) => {
                tracing::warn!(path = %path, error = %e, errno = ?errno(&e), "an unlink answered behind failed; the name is back");
                self.cache.unlink_answered(path, false);
                self.forget_in_kernel(parent, name);
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
