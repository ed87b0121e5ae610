//! The attribute and negative-entry cache in front of the server, keyed by path, each entry
//! trusted for `cache_ttl` (sshfs `cache.c`). The kernel keeps its own dentry and attribute
//! caches with the same TTL; this one catches what the kernel asks again (a `getattr` after a
//! `readdirplus`, a lookup of a name just listed or just found missing).
//!
//! Everything this mount changes is invalidated here at once; what other mounts change is seen
//! once the TTL has passed.
//!
//! A directory this mount created is known to be *complete* for one TTL: it was empty, and every
//! name added through this mount is recorded, so a name it does not hold is absent without
//! asking (the lookup the kernel makes before each create in a fresh tree, `tar x`, costs no
//! round trip). Anything that loses track of a name (a rename, an error) drops the completeness.

use homefs_shared::{Attr, Timestamp, WirePath};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most entries kept. Past it, expired entries are dropped, and if that is not enough the
/// whole cache is: a cache this size only matters for huge trees walked within one TTL.
const MAX_ENTRIES: usize = 200_000;

fn parent_of(path: &WirePath) -> Option<WirePath> {
    path.split_last().map(|(parent, _)| parent)
}

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
    /// `None`: the path exists, its attributes are not known (they changed through us).
    what: Option<Cached>,
    until: Instant,
}

#[derive(Debug, Default)]
struct Maps {
    entries: HashMap<WirePath, Entry>,
    /// Directories whose every entry is in `entries`, until when.
    complete: HashMap<WirePath, Instant>,
}

/// Path -> attributes or absence, each for one TTL.
#[derive(Debug)]
pub struct AttrCache {
    ttl: Duration,
    /// Guards the entries; held only for a map operation.
    maps: Mutex<Maps>,
}

impl AttrCache {
    /// A cache whose entries live `ttl` (zero: nothing is cached).
    pub fn new(ttl: Duration) -> AttrCache {
        AttrCache { ttl, maps: Mutex::new(Maps::default()) }
    }

    /// How long entries live (also the TTL given to the kernel).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // Plain data: recover from a poisoned lock rather than fail every later call.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known of `path`, if still fresh.
    pub fn get(&self, path: &WirePath) -> Option<Cached> {
        let now = Instant::now();
        let mut maps = self.lock();
        match maps.entries.get(path) {
            Some(entry) if entry.until > now => return entry.what,
            Some(_) => {
                maps.entries.remove(path);
            }
            None => {}
        }
        // Not recorded: absent if its directory is complete. An entry added while the directory
        // was complete lives at least as long as the completeness, so none has expired unseen.
        let parent = parent_of(path)?;
        match maps.complete.get(&parent) {
            Some(until) if *until > now => Some(Cached::Absent),
            Some(_) => {
                maps.complete.remove(&parent);
                None
            }
            None => None,
        }
    }

    /// `dir` was just created through this mount: it is empty, and stays known for one TTL.
    pub fn put_complete_dir(&self, dir: &WirePath) {
        if self.ttl.is_zero() {
            return;
        }
        let until = Instant::now() + self.ttl;
        self.lock().complete.insert(dir.clone(), until);
    }

    /// Whether `dir` is known to be complete (for tests and the profile).
    pub fn is_complete_dir(&self, dir: &WirePath) -> bool {
        self.lock().complete.get(dir).is_some_and(|u| *u > Instant::now())
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
        let mut maps = self.lock();
        if maps.entries.len() >= MAX_ENTRIES {
            maps.entries.retain(|_, e| e.until > now);
            if maps.entries.len() >= MAX_ENTRIES {
                maps.entries.clear();
                maps.complete.clear();
            }
        }
        // Never shorten what is known: a completeness may rely on this entry's lifetime.
        let until = match maps.entries.get(path) {
            Some(e) => e.until.max(now + self.ttl),
            None => now + self.ttl,
        };
        maps.entries.insert(path.clone(), Entry { what: Some(what), until });
    }

    /// Forgets `path`'s attributes but remembers that it exists (it changed through us): its
    /// directory stays complete.
    pub fn invalidate_attr(&self, path: &WirePath) {
        let mut maps = self.lock();
        match maps.entries.get_mut(path) {
            Some(e) if e.until > Instant::now() => e.what = None,
            _ => {
                maps.entries.remove(path);
                if let Some(parent) = parent_of(path) {
                    maps.complete.remove(&parent);
                }
            }
        }
    }

    /// A directory gained or lost an entry through us (create, unlink, symlink, link): its
    /// mtime and ctime moved. Cached attributes are kept with both set to `now` (this host's
    /// clock, within the server's by the skew) rather than dropped, so the permission check the
    /// kernel makes on the directory before the next create or unlink (`default_permissions`)
    /// needs no round trip; the server's exact times come back after one TTL.
    pub fn touch_dir(&self, path: &WirePath, now: Timestamp) {
        let mut maps = self.lock();
        if let Some(e) = maps.entries.get_mut(path) {
            if e.until > Instant::now() {
                if let Some(Cached::Present(a)) = &mut e.what {
                    a.mtime = a.mtime.max(now);
                    a.ctime = a.ctime.max(now);
                    return;
                }
            }
        }
        drop(maps);
        self.invalidate_attr(path);
    }

    /// Forgets `path`; its directory is no longer known to be complete.
    pub fn invalidate(&self, path: &WirePath) {
        let mut maps = self.lock();
        maps.entries.remove(path);
        if let Some(parent) = parent_of(path) {
            maps.complete.remove(&parent);
        }
    }

    /// Forgets `path` and everything below it (a renamed or removed directory).
    pub fn invalidate_tree(&self, path: &WirePath) {
        let mut maps = self.lock();
        if path.is_root() {
            maps.entries.clear();
            maps.complete.clear();
            return;
        }
        let dir = path.as_bytes();
        let below = |p: &WirePath| {
            let p = p.as_bytes();
            p.starts_with(dir) && (p.len() == dir.len() || p[dir.len()] == b'/')
        };
        maps.entries.retain(|p, _| !below(p));
        maps.complete.retain(|p, _| !below(p));
        if let Some(parent) = parent_of(path) {
            maps.complete.remove(&parent);
        }
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
    fn complete_dir_answers_absent_until_it_loses_track() {
        let c = AttrCache::new(Duration::from_secs(60));
        let (d, f, g) = (WirePath::new("d").unwrap(), WirePath::new("d/f").unwrap(), WirePath::new("d/g").unwrap());
        assert_eq!(c.get(&f), None);
        c.put_complete_dir(&d);
        assert_eq!(c.get(&f), Some(Cached::Absent));
        c.put(&f, &attr());
        assert_eq!(c.get(&f), Some(Cached::Present(attr())));
        // Written through us: attributes unknown, existence still known, `d` still complete.
        c.invalidate_attr(&f);
        assert_eq!(c.get(&f), None);
        assert_eq!(c.get(&g), Some(Cached::Absent));
        // A name we lose track of (an error, a rename) makes the directory unknown again.
        c.invalidate(&f);
        assert_eq!(c.get(&g), None);
        assert!(!c.is_complete_dir(&d));
        c.put_complete_dir(&d);
        c.invalidate_tree(&WirePath::new("d").unwrap());
        assert_eq!(c.get(&g), None);
    }

    #[test]
    fn touched_dir_keeps_its_attributes_with_new_times() {
        let c = AttrCache::new(Duration::from_secs(60));
        let d = WirePath::new("d").unwrap();
        c.put(&d, &attr());
        let now = Timestamp { secs: 100, nanos: 5 };
        c.touch_dir(&d, now);
        let Some(Cached::Present(a)) = c.get(&d) else { panic!("attributes dropped") };
        assert_eq!((a.mtime, a.ctime, a.size, a.perm), (now, now, 3, 0o644));
        // Nothing cached: nothing to touch, and nothing made up.
        let e = WirePath::new("e").unwrap();
        c.touch_dir(&e, now);
        assert_eq!(c.get(&e), None);
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let c = AttrCache::new(Duration::ZERO);
        let a = WirePath::new("a").unwrap();
        c.put(&a, &attr());
        c.put_complete_dir(&a);
        assert_eq!(c.get(&a), None);
        assert_eq!(c.get(&WirePath::new("a/b").unwrap()), None);
    }
}
