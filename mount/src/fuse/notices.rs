//! Change notices from the server applied to this mount's caches: what another connection of the
//! user changed is dropped from the metadata cache (`cache.rs`) and from the kernel's dentry and
//! attribute caches (fuser's `Notifier`), so both may keep what they know for long.
//!
//! The client calls [`NoticeFn`] from its connection's reader task, which must not wait: the
//! callback only queues (a bounded queue; when it is full the next pass drops everything, as a
//! lost notice must). One thread of its own applies the queue, because a kernel invalidation can
//! wait on locks held by requests that the runtime is still answering (never on this thread's).
//!
//! TTL with notices: [`NOTIFIED_CACHE_TTL`], 60 s. Notices make staleness a matter of
//! milliseconds for every change made through the server; the TTL then only bounds what no notice
//! reports: changes made directly on the server's disk. 60 s is NFS's `acdirmax` (NFS has no
//! notices at all; sshfs trusts 20 s with none, rclone mount's `--dir-cache-time` is 5 min), and an
//! explicit `-o cache_ttl=S` still wins.
//! Without notices (an older fsd refuses `Subscribe`) the mount keeps its short TTL.

use bytes::Bytes;
use fuser::{INodeNo, Notifier};
use homefs_shared::{Request, WirePath};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::inodes::ROOT_INO;
use super::ops::Remote;
use crate::client::{Notice, NoticeFn};

/// The cache TTL while the server sends change notices (see the module doc).
pub const NOTIFIED_CACHE_TTL: Duration = Duration::from_secs(60);
/// Notices queued for the applying thread; past this, the next pass forgets everything.
const QUEUE: usize = 4096;

/// Counts of what the notices did (for the profile and tests).
#[derive(Debug, Default)]
pub struct NoticeStats {
    pub notices: AtomicU64,
    pub paths: AtomicU64,
    pub everything: AtomicU64,
}

impl NoticeStats {
    /// `name=count` of each kind.
    pub fn show(&self) -> String {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        format!("notices={} paths={} everything={}", get(&self.notices), get(&self.paths), get(&self.everything))
    }
}

/// Subscribes `remote`'s client to change notices and applies them from now on. Returns whether
/// the server sends them; if so, the cache TTL becomes `ttl`.
pub async fn start(remote: &Arc<Remote>, ttl: Duration, stats: Arc<NoticeStats>) -> bool {
    let (tx, rx) = sync_channel::<Notice>(QUEUE);
    let lost = Arc::new(AtomicU64::new(0));
    let (counted, lost_here) = (Arc::downgrade(remote), lost.clone());
    let to: NoticeFn = Arc::new(move |n| {
        match tx.try_send(n) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                lost_here.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
        // Counted as received in arrival order, before the reader reads the next frame (a lock
        // grant waits for every notice received before it: `applied.rs`).
        if let Some(remote) = counted.upgrade() {
            remote.notices.received();
            // Another connection changed something (or everything may have changed): the usage
            // figures are stale from now (`usage.rs`).
            remote.usage.changed();
        }
    });
    let weak = Arc::downgrade(remote);
    let thread_stats = stats.clone();
    let spawned = std::thread::Builder::new()
        .name("netmount-notices".into())
        .spawn(move || apply_all(weak, rx, lost, thread_stats));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the change notice thread; keeping the short cache TTL");
        return false;
    }
    // Asked once on its own first: a server that refuses must not be asked again after every
    // reconnect (the client re-subscribes each new connection once `subscribe` was called, and
    // gives that connection up when refused), and an fsd older than `Subscribe` drops the
    // connection at the unknown request, which the client then makes again.
    if let Err(e) = remote.client.call(Request::Subscribe, Bytes::new()).await {
        tracing::info!(error = %e, ttl = ?remote.cache.ttl(), "the server sends no change notices");
        return false;
    }
    match remote.client.subscribe(to).await {
        Ok(()) => {
            remote.cache.set_ttl(ttl);
            tracing::info!(ttl = ?ttl, "change notices on");
            true
        }
        Err(e) => {
            tracing::info!(error = %e, ttl = ?remote.cache.ttl(), "the server sends no change notices");
            false
        }
    }
}

/// The applying thread: runs until the mount's state is gone and the queue's sender with it.
fn apply_all(remote: Weak<Remote>, rx: Receiver<Notice>, lost: Arc<AtomicU64>, stats: Arc<NoticeStats>) {
    while let Ok(notice) = rx.recv() {
        let Some(remote) = remote.upgrade() else { return };
        stats.notices.fetch_add(1, Ordering::Relaxed);
        let everything = match notice {
            Notice::Changed { all: true, .. } | Notice::Reconnected => true,
            Notice::Changed { paths, all: false } => {
                stats.paths.fetch_add(paths.len() as u64, Ordering::Relaxed);
                changed(&remote, &paths);
                false
            }
        };
        // A notice that did not fit in the queue is lost: everything may be stale.
        let lost = lost.swap(0, Ordering::AcqRel);
        if everything || lost > 0 {
            stats.everything.fetch_add(1, Ordering::Relaxed);
            forget_everything(&remote);
        }
        remote.notices.applied(1 + lost);
    }
}

/// `path` as this mount spells it (`a/b`), whatever the other client sent (`/a//b`, `./a/b`).
fn canonical(path: &WirePath) -> Option<WirePath> {
    let comps: Vec<&[u8]> = path.components().collect();
    if comps.is_empty() {
        return Some(WirePath::root());
    }
    WirePath::new(comps.join(&b'/')).ok()
}

/// Another connection changed `paths`: drop them here, then in the kernel.
fn changed(remote: &Remote, paths: &[WirePath]) {
    let paths: Vec<WirePath> = paths.iter().filter_map(canonical).collect();
    remote.cache.changed(&paths);
    let Some(notifier) = remote.notifier.get() else { return };
    let mut wanted: HashSet<WirePath> = paths.iter().cloned().collect();
    wanted.extend(paths.iter().filter_map(|p| p.split_last().map(|(parent, _)| parent)));
    let inos = remote.inodes.inos_of(&wanted);
    for path in &paths {
        // Its contents and attributes: the kernel asks again.
        if let Some(ino) = inos.get(path) {
            invalidate_inode(notifier, *ino, 0);
        }
        let Some((parent, name)) = path.split_last() else { continue };
        if let Some(parent_ino) = inos.get(&parent) {
            // The name (positive or negative dentry), and the directory's times.
            invalidate_entry(notifier, *parent_ino, name);
            invalidate_inode(notifier, *parent_ino, -1);
        }
    }
}

/// Notices were lost: forget every cached entry, and every name and attribute the kernel holds.
/// (Negative dentries the kernel holds are unknown here; they live only `negative_ttl`.)
fn forget_everything(remote: &Remote) {
    remote.cache.clear();
    let Some(notifier) = remote.notifier.get() else { return };
    let all = remote.inodes.all();
    let wanted: HashSet<WirePath> = all.iter().filter_map(|(_, p)| p.split_last().map(|(parent, _)| parent)).collect();
    let inos = remote.inodes.inos_of(&wanted);
    for (ino, path) in &all {
        invalidate_inode(notifier, *ino, -1);
        if *ino == ROOT_INO {
            continue;
        }
        if let Some((parent, name)) = path.split_last() {
            if let Some(parent_ino) = inos.get(&parent) {
                invalidate_entry(notifier, *parent_ino, name);
            }
        }
    }
}

/// `offset` 0: attributes and cached pages; -1: attributes only. ENOENT (the kernel forgot the
/// inode meanwhile) is the common, harmless answer.
fn invalidate_inode(notifier: &Notifier, ino: u64, offset: i64) {
    if let Err(e) = notifier.inval_inode(INodeNo(ino), offset, 0) {
        tracing::trace!(ino, error = %e, "inval_inode");
    }
}

fn invalidate_entry(notifier: &Notifier, parent: u64, name: &[u8]) {
    if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(name)) {
        tracing::trace!(parent, error = %e, "inval_entry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_spelled_as_the_mount_spells_them() {
        let p = |s: &str| WirePath::new(s).unwrap();
        assert_eq!(canonical(&p("/a//b/")), Some(p("a/b")));
        assert_eq!(canonical(&p("./a/./b")), Some(p("a/b")));
        assert_eq!(canonical(&p("/")), Some(WirePath::root()));
        assert_eq!(canonical(&p("a/b")), Some(p("a").join(b"b").unwrap()));
    }
}
