//! Reading a directory stream after its directory changed through this mount (or a change
//! notice came): `readdirplus` serves the snapshot taken at `opendir`, and every entry it gives
//! the kernel becomes a dentry with attributes. An entry the change took away (unlinked, renamed
//! away, replaced, a file created behind whose store was refused) must not come back as a
//! dentry, and an entry whose attributes moved (a write) must not bring the old ones back: the
//! kernel keeps both for a TTL, and guards neither against an answer made from an older state.
//!
//! So while the directory is unchanged since the snapshot (the cache's generation, the common
//! case) entries go as they are; after a change each entry is checked against what this mount
//! knows now ([`Remote::listed_now`]): the current attributes when known; when known gone, the
//! name with inode 0, which the kernel lists without making a dentry (POSIX leaves it open whether
//! a name removed after `opendir` is listed; a `stat` of it then fails, as for a file removed
//! between `readdir` and `stat`); and when unknown, the snapshot's with a TTL of zero (the kernel
//! asks again at its next use).

use homefs_shared::{Attr, FileKind, WirePath};

use super::cache::Cached;
use super::ops::Remote;

/// What the kernel may be told now of one entry of a snapshot taken before its directory changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// The name is there, with these attributes (the same file or the one that replaced it).
    Now(Attr),
    /// Not known now: the snapshot's attributes, valid for no time.
    Unsure,
    /// Known gone: listed without a dentry.
    Gone,
}

impl Remote {
    /// What `path`, listed with `listed` by a snapshot older than a change in its directory, is now.
    pub fn listed_now(&self, path: &WirePath, listed: &Attr) -> Listed {
        if let Some(pending) = self.created_attr_at(path) {
            // Being stored: it may be refused and go.
            return pending.map_or(Listed::Unsure, Listed::Now);
        }
        match self.cache.get(path) {
            // Writes queued on it: the kernel's size is newer than any here.
            Some(Cached::Present(a)) if self.writes_pending_on(a.ino).is_some() => Listed::Unsure,
            Some(Cached::Present(a)) => Listed::Now(a),
            Some(Cached::Absent) => Listed::Gone,
            None => {
                let ino = self.inodes.fuse_ino(listed.ino);
                let one_name = listed.kind == FileKind::Dir || listed.nlink <= 1;
                if self.inodes.gone_from(ino, path, one_name) {
                    Listed::Gone
                } else {
                    Listed::Unsure
                }
            }
        }
    }
}
