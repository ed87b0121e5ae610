//! Counts of the requests this client sent, by kind: the profile of a workload in round trips
//! (`netmount` logs them when it unmounts). Relaxed atomics, one per kind: free next to a round trip.

use homefs_shared::Request;
use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds counted, in the order [`kind`] numbers them.
const KINDS: [&str; 33] = [
    "hello",
    "login",
    "resume",
    "stat",
    "readdir",
    "mkdir",
    "rmdir",
    "unlink",
    "rename",
    "open",
    "read",
    "write",
    "close",
    "setattr",
    "symlink",
    "readlink",
    "link",
    "fsync",
    "statfs",
    "copy_range",
    "checksum",
    "lock",
    "test_lock",
    "ping",
    "write_attr",
    "subscribe",
    "put_file",
    "get_file",
    "sync_fs",
    "put_files",
    "get_files",
    "sync",
    "remove",
];

/// The index of a request's kind in [`KINDS`].
fn kind(r: &Request) -> usize {
    match r {
        Request::Hello { .. } => 0,
        Request::Login { .. } => 1,
        Request::Resume { .. } => 2,
        Request::Stat { .. } => 3,
        Request::ReadDir { .. } => 4,
        Request::Mkdir { .. } => 5,
        Request::Rmdir { .. } => 6,
        Request::Unlink { .. } => 7,
        Request::Rename { .. } => 8,
        Request::Open { .. } => 9,
        Request::Read { .. } => 10,
        Request::Write { .. } => 11,
        Request::Close { .. } => 12,
        Request::SetAttr { .. } => 13,
        Request::Symlink { .. } => 14,
        Request::ReadLink { .. } => 15,
        Request::Link { .. } => 16,
        Request::Fsync { .. } => 17,
        Request::StatFs => 18,
        Request::CopyRange { .. } => 19,
        Request::Checksum { .. } => 20,
        Request::Lock { .. } => 21,
        Request::TestLock { .. } => 22,
        Request::Ping => 23,
        Request::WriteAttr { .. } => 24,
        Request::Subscribe => 25,
        Request::PutFile { .. } => 26,
        Request::GetFile { .. } => 27,
        Request::SyncFs => 28,
        Request::PutFiles { .. } => 29,
        Request::GetFiles { .. } => 30,
        Request::Sync { .. } => 31,
        Request::Remove { .. } => 32,
    }
}

/// Requests sent, by kind.
pub(crate) struct Counts {
    sent: [AtomicU64; KINDS.len()],
}

impl Default for Counts {
    /// All zero (`Default` is derived for arrays of at most 32 elements only).
    fn default() -> Counts {
        Counts { sent: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl Counts {
    /// One more request of `r`'s kind.
    pub(crate) fn count(&self, r: &Request) {
        self.sent[kind(r)].fetch_add(1, Ordering::Relaxed);
    }

    /// The kinds sent at least once, with their counts.
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        KINDS.iter().zip(&self.sent).map(|(k, n)| (*k, n.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homefs_shared::WirePath;

    #[test]
    fn counts_by_kind() {
        let c = Counts::default();
        c.count(&Request::Ping);
        c.count(&Request::Ping);
        c.count(&Request::Stat { path: WirePath::root() });
        assert_eq!(c.snapshot(), vec![("stat", 1), ("ping", 2)]);
    }
}
