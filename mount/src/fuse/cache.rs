//! The attribute and negative-entry cache in front of the server, keyed by path, each entry
//! trusted for `cache_ttl` (sshfs `cache.c`). The kernel keeps its own dentry and attribute
//! caches with the same TTL; this one catches what the kernel asks again (a `getattr` after a
//! `readdirplus`, a lookup of a name just listed or just found missing).
//!
//! Everything this mount changes is invalidated here at once; what other mounts change is seen
//! once the TTL has passed.

use homefs_shared::{Attr, WirePath};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most entries kept. Past it, expired entries are dropped, and if that is not enough the
/// whole cache is: a cache this size only matters for huge trees walked within one TTL.
const MAX_ENTRIES: usize = 200_000;

/// What the cache knows of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// The path exists with these attributes.
    Present(Attr),
    /// The path does not exist.
    Absent,
}

#[derive(Debug)]
struct Entry {
    what: Cached,
    until: Instant,
}

/// Path -> attributes or absence, each for one TTL.
#[derive(Debug)]
pub struct AttrCache {
    ttl: Duration,
    /// Guards the entries; held only for a map operation.
    entries: Mutex<HashMap<WirePath, Entry>>,
}

impl AttrCache {
    /// A cache whose entries live `ttl` (zero: nothing is cached).
    pub fn new(ttl: Duration) -> AttrCache {
        AttrCache { ttl, entries: Mutex::new(HashMap::new()) }
    }

    /// How long entries live (also the TTL given to the kernel).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WirePath, Entry>> {
        // Plain data: recover from a poisoned lock rather than fail every later call.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known of `path`, if still fresh.
    pub fn get(&self, path: &WirePath) -> Option<Cached> {
        let mut entries = self.lock();
        let entry = entries.get(path)?;
        if entry.until > Instant::now() {
            return Some(entry.what);
        }
        entries.remove(path);
        None
    }

    /// `path` exists with `attr`.
    pub fn put(&self, path: &WirePath, attr: &Attr) {
        self.insert(path, Cached::Present(*attr));
    }

    /// `path` does not exist.
    pub fn put_absent(&self, path: &WirePath) {
        self.insert(path, Cached::Absent);
    }

    fn insert(&self, path: &WirePath, what: Cached) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.until > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(path.clone(), Entry { what, until: now + self.ttl });
    }

    /// Forgets `path`.
    pub fn invalidate(&self, path: &WirePath) {
        self.lock().remove(path);
    }

    /// Forgets `path` and everything below it (a renamed or removed directory).
    pub fn invalidate_tree(&self, path: &WirePath) {
        if path.is_root() {
            self.lock().clear();
            return;
        }
        let dir = path.as_bytes();
        self.lock().retain(|p, _| {
            let p = p.as_bytes();
            !(p.starts_with(dir) && (p.len() == dir.len() || p[dir.len()] == b'/'))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homefs_shared::{FileKind, Timestamp};

    fn attr() -> Attr {
        let t = Timestamp::default();
        Attr { ino: 9, kind: FileKind::File, perm: 0o644, nlink: 1, size: 3, blocks: 0, atime: t, mtime: t, ctime: t }
    }

    #[test]
    fn hits_until_invalidated() {
        let c = AttrCache::new(Duration::from_secs(60));
        let (a, ab, b) = (WirePath::new("a").unwrap(), WirePath::new("a/b").unwrap(), WirePath::new("ab").unwrap());
        c.put(&a, &attr());
        c.put(&ab, &attr());
        c.put_absent(&b);
        assert_eq!(c.get(&a), Some(Cached::Present(attr())));
        assert_eq!(c.get(&b), Some(Cached::Absent));
        c.invalidate_tree(&a);
        assert_eq!(c.get(&a), None);
        assert_eq!(c.get(&ab), None);
        assert_eq!(c.get(&b), Some(Cached::Absent));
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let c = AttrCache::new(Duration::ZERO);
        let a = WirePath::new("a").unwrap();
        c.put(&a, &attr());
        assert_eq!(c.get(&a), None);
    }
}
