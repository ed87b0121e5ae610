//! The metadata cache in front of the server, keyed by path (like sshfs's `cache.c`, but kept
//! coherent): attributes of entries, absent names, and whole directory listings (names; their
//! attributes are entries), each trusted for the cache TTL.
//!
//! The kernel keeps its own dentry and attribute caches; this one answers what the kernel asks
//! again (a `getattr` after a `readdirplus`, a lookup of a name just listed or just found missing)
//! and what it forgot (`drop_caches`, memory pressure): `find` or `git status` run twice walk the
//! second time without a round trip.
//!
//! Coherence: everything this mount changes is updated here in place from the server's answers.
//! What other connections change arrives as change notices (`notices.rs`), which drop the named
//! paths, their subtrees and their parents' listings at once; the TTL then only bounds what no
//! notice reports (changes made directly on the server's disk, or a server without notices, when
//! it stays short). A fetch that started before a notice, or before a change this mount made in
//! the same directory, is not stored ([`AttrCache::generation`]).
//!
//! A directory whose listing is known is *complete*: a name it does not hold is absent without
//! asking. A directory this mount just created is complete and empty, so the lookup the kernel
//! makes before each create in a fresh tree (`tar x`) costs no round trip.
//!
//! Memory is bounded: at most [`MAX_ENTRIES`] entries and [`MAX_LISTED`] listed names; past
//! either, expired ones go, then half of the rest (an arbitrary half: whatever goes is asked again).
//!
//! Unlinks answered before the server has them (`unlinks.rs`): the name is absent here at once,
//! and its directory is marked *pending* until the server answers. Under the same lock as the
//! maps, a listing or stat answer for that directory which was asked for before the last unlink
//! in it was answered, or while one is still pending, is not stored: it may still hold the name.

use homefs_shared::{Attr, DirEntry, Timestamp, WirePath};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

use super::unlinks::Outbox;

/// The most entries kept (about 200 bytes each: ~10 MiB), enough for the benchmark's trees.
pub const MAX_ENTRIES: usize = 50_000;
/// The most names kept in listings, all directories together (about 80 bytes each: ~4 MiB).
pub const MAX_LISTED: usize = 50_000;
/// Unlinks answered and not yet confirmed by the server, per mount; past it, an unlink waits.
pub const MAX_UNLINKS_BEHIND: usize = 256;
/// Directories whose last unlink-behind is remembered (see [`AttrCache::generation`]); past it,
/// those with none pending are forgotten at once, and every fetch older than that is stale.
const MAX_BEHIND_DIRS: usize = 4096;

fn parent_of(path: &WirePath) -> Option<(WirePath, Vec<u8>)> {
    path.split_last().map(|(parent, name)| (parent, name.to_vec()))
}

/// Whether `path` is `dir` or below it.
fn is_within(path: &WirePath, dir: &WirePath) -> bool {
    if dir.is_root() {
        return true;
    }
    let (p, d) = (path.as_bytes(), dir.as_bytes());
    p.starts_with(d) && (p.len() == d.len() || p[d.len()] == b'/')
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
    what: Cached,
    until: Instant,
}

/// Every name of one directory. The value is unused (a set kept sorted, as the server lists).
#[derive(Debug)]
struct Listing {
    names: BTreeMap<Vec<u8>, ()>,
    until: Instant,
}

/// One directory's unlinks answered behind: names still pending (with how many), and the
/// generation of its last unlink event (started or answered).
#[derive(Debug, Default)]
struct DirBehind {
    names: HashMap<Vec<u8>, u32>,
    last: u64,
}

#[derive(Debug, Default)]
struct Maps {
    entries: HashMap<WirePath, Entry>,
    listings: HashMap<WirePath, Listing>,
    /// Names in all listings together.
    listed: usize,
    /// Directories with unlinks answered behind (kept across [`AttrCache::clear`]).
    behind: HashMap<WirePath, DirBehind>,
    /// Fetches older than this generation are stale for every directory (`behind` was trimmed).
    behind_floor: u64,
    /// Unlinks pending in `behind`, all directories together.
    pending: usize,
    /// The generation of the latest change notice: fetches older than it are stale.
    notice_at: u64,
}

impl Maps {
    /// Forgets every entry and listing, but not what is pending on the server.
    fn reset(&mut self) {
        let (behind, behind_floor, notice_at, pending) =
            (std::mem::take(&mut self.behind), self.behind_floor, self.notice_at, self.pending);
        *self = Maps { behind, behind_floor, notice_at, pending, ..Maps::default() };
    }

    /// Whether an answer about `dir` (its listing, or one of its names) asked for at generation
    /// `generation` may predate a change: a notice since, or an unlink in `dir` pending or since.
    fn stale(&self, dir: Option<&WirePath>, generation: u64) -> bool {
        self.notice_at > generation
            || dir.is_some_and(|d| {
                self.behind_floor > generation
                    || self.behind.get(d).is_some_and(|b| b.last > generation || !b.names.is_empty())
            })
    }

    /// This mount changed `dir`'s entries or one of their attributes (an answer to its own
    /// request, or an invalidation) at `generation`: a listing of `dir`, or a stat of a name in
    /// it, asked for before may predate the change and must not overwrite it (a listing fetched
    /// while a write was in flight would bring back the file's old size; one fetched while a
    /// create was in flight would lose the new name).
    fn changed_locally(&mut self, path: &WirePath, generation: u64) {
        let Some((dir, _)) = parent_of(path) else { return };
        self.behind.entry(dir).or_default().last = generation;
        if self.behind.len() > MAX_BEHIND_DIRS {
            self.behind.retain(|_, d| !d.names.is_empty());
            self.behind_floor = generation;
        }
    }

    fn drop_listing(&mut self, dir: &WirePath) {
        if let Some(l) = self.listings.remove(dir) {
            self.listed -= l.names.len();
        }
    }

    fn make_room_for_entries(&mut self, more: usize, now: Instant) {
        if self.entries.len() + more <= MAX_ENTRIES {
            return;
        }
        self.entries.retain(|_, e| e.until > now);
        let mut n = 0u64;
        while self.entries.len() + more > MAX_ENTRIES && !self.entries.is_empty() {
            self.entries.retain(|_, _| {
                n += 1;
                n % 2 == 0
            });
        }
    }

    fn make_room_for_names(&mut self, more: usize, now: Instant) {
        if self.listed + more <= MAX_LISTED {
            return;
        }
        self.listings.retain(|_, l| l.until > now);
        let mut n = 0u64;
        while self.listed_now() + more > MAX_LISTED && !self.listings.is_empty() {
            self.listings.retain(|_, _| {
                n += 1;
                n % 2 == 0
            });
        }
        self.listed = self.listed_now();
    }

    fn listed_now(&self) -> usize {
        self.listings.values().map(|l| l.names.len()).sum()
    }
}

/// Path -> attributes or absence, and directory -> names, each for one TTL.
#[derive(Debug)]
pub struct AttrCache {
    /// The TTL in nanoseconds (set longer once change notices are on).
    ttl_nanos: AtomicU64,
    /// The TTL the cache was made with: the kernel's for negative entries, which no notice can
    /// reach when the name is unknown (after a reconnect, every one may be stale).
    base_ttl: Duration,
    /// Bumped by every change notice; see [`AttrCache::generation`].
    generation: AtomicU64,
    /// Guards the maps; held only for a map operation, never across an await.
    maps: Mutex<Maps>,
    /// Woken whenever an unlink answered behind is confirmed (or failed).
    unlinks_done: Notify,
    /// Permits for unlinks answered behind ([`MAX_UNLINKS_BEHIND`]).
    pub unlink_slots: Arc<Semaphore>,
    /// Unlinks answered behind, queued for the next batch (`unlinks.rs`).
    pub outbox: Outbox,
}

impl AttrCache {
    /// A cache whose entries live `ttl` (zero: nothing is cached).
    pub fn new(ttl: Duration) -> AttrCache {
        AttrCache {
            ttl_nanos: AtomicU64::new(ttl.as_nanos().min(u128::from(u64::MAX)) as u64),
            base_ttl: ttl,
            generation: AtomicU64::new(0),
            maps: Mutex::new(Maps::default()),
            unlinks_done: Notify::new(),
            unlink_slots: Arc::new(Semaphore::new(MAX_UNLINKS_BEHIND)),
            outbox: Outbox::default(),
        }
    }

    /// How long entries live (also the TTL given to the kernel for what it can be told to drop).
    pub fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl_nanos.load(Ordering::Relaxed))
    }

    /// How long the kernel may keep a negative entry: the TTL the cache was made with.
    pub fn negative_ttl(&self) -> Duration {
        self.base_ttl.min(self.ttl())
    }

    /// Changes the TTL of entries stored from now on (change notices turned on or off).
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_nanos.store(ttl.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// A counter of the changes an answer may race with: change notices, this mount's unlinks
    /// answered behind, and every change this mount's own answers make here. Read it before
    /// asking the server, and pass it to [`AttrCache::put_fetched`] or
    /// [`AttrCache::put_listing`]: an answer that raced with a notice, or with a change in the
    /// same directory, may predate the change, and is not stored.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether `dir`'s entries may have changed since `generation` (a change through this mount
    /// in it, an unlink in it pending, or a change notice).
    pub fn changed_since(&self, dir: &WirePath, generation: u64) -> bool {
        self.lock().stale(Some(dir), generation)
    }

    fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
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
            Some(entry) if entry.until > now => return Some(entry.what),
            Some(_) => {
                maps.entries.remove(path);
            }
            None => {}
        }
        // Not recorded: absent if its directory's listing is known and lacks the name.
        let (parent, name) = parent_of(path)?;
        match maps.listings.get(&parent) {
            Some(l) if l.until > now => (!l.names.contains_key(&name)).then_some(Cached::Absent),
            Some(_) => {
                maps.drop_listing(&parent);
                None
            }
            None => None,
        }
    }

    /// The listing of `dir` with every entry's attributes, if all are known and fresh.
    pub fn listing(&self, dir: &WirePath) -> Option<Vec<DirEntry>> {
        let now = Instant::now();
        let maps = self.lock();
        let l = maps.listings.get(dir).filter(|l| l.until > now)?;
        let mut out = Vec::with_capacity(l.names.len());
        for name in l.names.keys() {
            let path = dir.join(name).ok()?;
            match maps.entries.get(&path) {
                Some(Entry { what: Cached::Present(attr), until }) if *until > now => {
                    out.push(DirEntry { name: name.clone(), attr: *attr })
                }
                _ => return None,
            }
        }
        Some(out)
    }

    /// `dir`'s whole listing, fetched from the server when the generation was `generation`.
    pub fn put_listing(&self, dir: &WirePath, entries: &[DirEntry], generation: u64) {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let until = now + ttl;
        let mut maps = self.lock();
        // Checked under the lock: notices and unlinks take it too, so none slips in between.
        if maps.stale(Some(dir), generation) {
            return;
        }
        maps.drop_listing(dir);
        maps.make_room_for_names(entries.len(), now);
        if entries.len() <= MAX_LISTED {
            let names = entries.iter().map(|e| (e.name.clone(), ())).collect();
            maps.listed += entries.len();
            maps.listings.insert(dir.clone(), Listing { names, until });
        }
        maps.make_room_for_entries(entries.len().min(MAX_ENTRIES), now);
        for e in entries.iter().take(MAX_ENTRIES) {
            if let Ok(p) = dir.join(&e.name) {
                maps.entries.insert(p, Entry { what: Cached::Present(e.attr), until });
            }
        }
    }

    /// The subdirectories of `dir` listed after `name` (the next `n` at most), if its listing and
    /// their attributes are known: the window a sliding read-ahead keeps fetched.
    pub fn subdirs_after(&self, dir: &WirePath, name: &[u8], n: usize) -> Vec<WirePath> {
        use std::ops::Bound;
        let now = Instant::now();
        let maps = self.lock();
        let Some(l) = maps.listings.get(dir).filter(|l| l.until > now) else { return Vec::new() };
        l.names
            .range::<[u8], _>((Bound::Excluded(name), Bound::Unbounded))
            .filter_map(|(sub, ())| dir.join(sub).ok())
            .filter(|p| {
                matches!(maps.entries.get(p), Some(Entry { what: Cached::Present(a), until })
                    if *until > now && a.kind == homefs_shared::FileKind::Dir)
            })
            .take(n)
            .collect()
    }

    /// `dir` was just created through this mount: it is empty, and stays known for one TTL.
    pub fn put_complete_dir(&self, dir: &WirePath) {
        self.put_listing(dir, &[], self.generation());
    }

    /// Whether `dir`'s listing is known (for tests and the profile).
    pub fn is_complete_dir(&self, dir: &WirePath) -> bool {
        self.lock().listings.get(dir).is_some_and(|l| l.until > Instant::now())
    }

    /// `path` exists with `attr` (an answer to this mount's own change, or a fetch that cannot
    /// have raced a notice); its name joins its directory's listing, if that is known.
    pub fn put(&self, path: &WirePath, attr: &Attr) {
        self.insert(path, Cached::Present(*attr), None);
    }

    /// New attributes of the file `path` names now (a write's answer): kept only while the cache
    /// still has `path` present as that same file. A write answered after the name went (an
    /// unlink or rename racing the answer) must not bring the name back.
    pub fn refresh(&self, path: &WirePath, attr: &Attr) {
        let ttl = self.ttl();
        let mut maps = self.lock();
        maps.changed_locally(path, self.bump());
        if let Some(e) = maps.entries.get_mut(path) {
            if matches!(e.what, Cached::Present(old) if old.ino == attr.ino) {
                *e = Entry { what: Cached::Present(*attr), until: Instant::now() + ttl };
            }
        }
    }

    /// As [`AttrCache::put`], for attributes fetched when the generation was `generation`.
    pub fn put_fetched(&self, path: &WirePath, attr: &Attr, generation: u64) {
        self.insert(path, Cached::Present(*attr), Some(generation));
    }

    /// `path` does not exist (fetched when the generation was `generation`, if given).
    pub fn put_absent(&self, path: &WirePath, generation: Option<u64>) {
        self.insert(path, Cached::Absent, generation);
    }

    fn insert(&self, path: &WirePath, what: Cached, generation: Option<u64>) {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut maps = self.lock();
        let parent = parent_of(path).map(|(parent, _)| parent);
        match generation {
            Some(g) if maps.stale(parent.as_ref(), g) => return,
            Some(_) => {}
            None => maps.changed_locally(path, self.bump()),
        }
        Self::insert_locked(&mut maps, path, what, now + ttl, now);
    }

    fn insert_locked(maps: &mut Maps, path: &WirePath, what: Cached, until: Instant, now: Instant) {
        maps.make_room_for_entries(1, now);
        maps.entries.insert(path.clone(), Entry { what, until });
        let Some((parent, name)) = parent_of(path) else { return };
        if let Some(l) = maps.listings.get_mut(&parent) {
            let changed = match what {
                Cached::Present(_) => l.names.insert(name, ()).is_none(),
                Cached::Absent => l.names.remove(&name).is_some(),
            };
            match (changed, what) {
                (true, Cached::Present(_)) => maps.listed += 1,
                (true, Cached::Absent) => maps.listed -= 1,
                _ => {}
            }
        }
    }

    /// Forgets `path`'s attributes (they changed through us) but not its name in its listing.
    pub fn invalidate_attr(&self, path: &WirePath) {
        let mut maps = self.lock();
        maps.changed_locally(path, self.bump());
        maps.entries.remove(path);
    }

    /// A directory gained or lost an entry through us (create, unlink, symlink, link): its
    /// mtime and ctime moved. Cached attributes are kept with both set to `now` (this host's
    /// clock, within the server's by the skew) rather than dropped, so the permission check the
    /// kernel makes on the directory before the next create or unlink (`default_permissions`)
    /// needs no round trip; the server's exact times come back after one TTL.
    /// `links`: the change in its link count (+1 for a subdirectory made, -1 for one removed).
    pub fn touch_dir(&self, path: &WirePath, now: Timestamp, links: i32) {
        let mut maps = self.lock();
        maps.changed_locally(path, self.bump());
        let Some(e) = maps.entries.get_mut(path) else { return };
        match &mut e.what {
            Cached::Present(a) if e.until > Instant::now() => {
                a.mtime = a.mtime.max(now);
                a.ctime = a.ctime.max(now);
                a.nlink = a.nlink.saturating_add_signed(links).max(1);
            }
            _ => {
                maps.entries.remove(path);
            }
        }
    }

    /// Forgets `path`, and its directory's listing: whether the name exists is unknown now.
    pub fn invalidate(&self, path: &WirePath) {
        let mut maps = self.lock();
        maps.changed_locally(path, self.bump());
        maps.entries.remove(path);
        if let Some((parent, _)) = parent_of(path) {
            maps.drop_listing(&parent);
        }
    }

    /// Forgets `path` and everything below it (a renamed or removed directory), and its
    /// directory's listing.
    pub fn invalidate_tree(&self, path: &WirePath) {
        let mut maps = self.lock();
        maps.changed_locally(path, self.bump());
        Self::drop_tree(&mut maps, path);
    }

    /// The directory `path` was removed through us: it and everything below it go; it is absent
    /// from its directory's listing, which stays known.
    pub fn removed_dir(&self, path: &WirePath) {
        {
            let mut maps = self.lock();
            maps.changed_locally(path, self.bump());
            maps.entries.retain(|p, _| !is_within(p, path));
            maps.listings.retain(|p, _| !is_within(p, path));
            maps.listed = maps.listed_now();
        }
        self.put_absent(path, None);
    }

    fn drop_tree(maps: &mut Maps, path: &WirePath) {
        if path.is_root() {
            maps.reset();
            return;
        }
        maps.entries.retain(|p, _| !is_within(p, path));
        maps.listings.retain(|p, _| !is_within(p, path));
        maps.listed = maps.listed_now();
        if let Some((parent, _)) = parent_of(path) {
            maps.drop_listing(&parent);
        }
    }

    /// A change notice: another connection changed each of `paths` (entry or content). Each
    /// goes with everything below it, its directory's listing and attributes (mtime moved), and
    /// no fetch in flight is stored.
    pub fn changed(&self, paths: &[WirePath]) {
        let mut maps = self.lock();
        maps.notice_at = self.bump();
        for path in paths {
            if path.is_root() {
                maps.entries.remove(path);
                maps.drop_listing(path);
                continue;
            }
            // Only what may hold entries below needs the scan of every entry: not a file we
            // know, nor a name its known listing lacks (nothing below it was ever seen).
            let known_file = matches!(
                maps.entries.get(path),
                Some(Entry { what: Cached::Present(a), .. }) if a.kind != homefs_shared::FileKind::Dir
            ) && !maps.listings.contains_key(path);
            let unseen = !maps.entries.contains_key(path)
                && parent_of(path).is_some_and(|(parent, name)| {
                    maps.listings.get(&parent).is_some_and(|l| !l.names.contains_key(&name))
                });
            if known_file || unseen {
                maps.entries.remove(path);
            } else {
                Self::drop_tree(&mut maps, path);
            }
            if let Some((parent, _)) = parent_of(path) {
                maps.drop_listing(&parent);
                maps.entries.remove(&parent);
            }
        }
    }

    /// Everything may be stale (notices were lost, or the connection was): forget it all.
    pub fn clear(&self) {
        let mut maps = self.lock();
        maps.notice_at = self.bump();
        maps.reset();
    }

    /// An unlink of `path` is answered before the server has it: the name is absent from now
    /// on, and its directory pending until [`AttrCache::unlink_answered`].
    pub fn unlink_started(&self, path: &WirePath) {
        let Some((parent, name)) = parent_of(path) else { return };
        let mut maps = self.lock();
        let generation = self.bump();
        let dir = maps.behind.entry(parent).or_default();
        *dir.names.entry(name).or_default() += 1;
        dir.last = generation;
        maps.pending += 1;
        let (ttl, now) = (self.ttl(), Instant::now());
        if !ttl.is_zero() {
            Self::insert_locked(&mut maps, path, Cached::Absent, now + ttl, now);
        }
    }

    /// The server answered the unlink of `path` started by [`AttrCache::unlink_started`]. When it
    /// failed, the name may exist after all: its entry, its directory's listing and attributes
    /// go, so the next lookup asks the server. Wakes those waiting for it.
    pub fn unlink_answered(&self, path: &WirePath, removed: bool) {
        let Some((parent, name)) = parent_of(path) else { return };
        {
            let mut guard = self.lock();
            let maps = &mut *guard;
            let generation = self.bump();
            if let Some(dir) = maps.behind.get_mut(&parent) {
                if let Some(n) = dir.names.get_mut(&name) {
                    *n -= 1;
                    if *n == 0 {
                        dir.names.remove(&name);
                    }
                    maps.pending -= 1;
                }
                dir.last = generation;
            }
            if !removed {
                maps.entries.remove(path);
                maps.entries.remove(&parent);
                maps.drop_listing(&parent);
            }
            if maps.behind.len() > MAX_BEHIND_DIRS {
                maps.behind.retain(|_, d| !d.names.is_empty());
                maps.behind_floor = generation;
            }
        }
        self.unlinks_done.notify_waiters();
    }

    /// Whether an unlink of `path` answered behind is still pending.
    pub fn unlink_pending_at(&self, path: &WirePath) -> bool {
        let Some((parent, name)) = parent_of(path) else { return false };
        self.lock().behind.get(&parent).is_some_and(|d| d.names.contains_key(&name))
    }

    /// Whether an unlink answered behind is still pending on a path for which `which(dir, name)`.
    pub fn unlinks_pending(&self, which: impl Fn(&WirePath, &[u8]) -> bool) -> bool {
        let maps = self.lock();
        maps.pending > 0 && maps.behind.iter().any(|(dir, d)| d.names.keys().any(|name| which(dir, name)))
    }

    /// Waits (at most `bound`) until no unlink answered behind is pending on a path for which
    /// `which(dir, name)`. Returns false if it gave up.
    pub async fn wait_for_unlinks(&self, bound: Duration, which: impl Fn(&WirePath, &[u8]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.unlinks_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.unlinks_pending(&which) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Entries and listed names held (for tests and the profile).
    pub fn size(&self) -> (usize, usize) {
        let maps = self.lock();
        (maps.entries.len(), maps.listed)
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
    fn p(s: &str) -> WirePath {
        WirePath::new(s).unwrap()
    }
    fn entry(name: &str) -> DirEntry {
        DirEntry { name: name.as_bytes().to_vec(), attr: attr() }
    }

    #[test]
    fn a_fetch_asked_for_before_a_change_of_this_mount_in_its_directory_is_not_stored() {
        let c = AttrCache::new(Duration::from_secs(60));
        c.put(&p("d"), &Attr { kind: FileKind::Dir, ..attr() });
        c.put_complete_dir(&p("d"));
        c.put(&p("d/f"), &attr());
        // A listing of d and a stat of d/f are asked for; a write's answer arrives first.
        let asked = c.generation();
        let written = Attr { size: 10, ..attr() };
        c.refresh(&p("d/f"), &written);
        c.put_listing(&p("d"), &[entry("f")], asked);
        c.put_fetched(&p("d/f"), &attr(), asked);
        assert_eq!(c.get(&p("d/f")), Some(Cached::Present(written)), "the older size did not come back");
        // A create answered while a listing was in flight: the name stays.
        let asked = c.generation();
        c.put(&p("d/new"), &attr());
        c.put_listing(&p("d"), &[entry("f")], asked);
        assert_eq!(c.get(&p("d/new")), Some(Cached::Present(attr())), "the new name was not lost");
        // Asked for after the change: stored.
        c.put_listing(&p("d"), &[entry("f")], c.generation());
        let names: Vec<Vec<u8>> = c.listing(&p("d")).expect("stored").into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec![b"f".to_vec()], "a later listing is the truth");
    }

    #[test]
    fn hits_until_invalidated() {
        let c = AttrCache::new(Duration::from_secs(60));
        c.put(&p("a"), &attr());
        c.put(&p("a/b"), &attr());
        c.put_absent(&p("ab"), None);
        assert_eq!(c.get(&p("a")), Some(Cached::Present(attr())));
        assert_eq!(c.get(&p("ab")), Some(Cached::Absent));
        c.invalidate_tree(&p("a"));
        assert_eq!(c.get(&p("a")), None);
        assert_eq!(c.get(&p("a/b")), None);
        assert_eq!(c.get(&p("ab")), Some(Cached::Absent));
    }

    /// A write's answer updates the file it was for, and never brings back a name that went
    /// (unlinked while the write was in flight) or names another file now.
    #[test]
    fn a_refresh_updates_only_the_same_file_still_present() {
        let c = AttrCache::new(Duration::from_secs(60));
        let grown = Attr { size: 11, ..attr() };
        c.put(&p("f"), &attr());
        c.refresh(&p("f"), &grown);
        assert_eq!(c.get(&p("f")), Some(Cached::Present(grown)));
        c.put_absent(&p("f"), None);
        c.refresh(&p("f"), &grown);
        assert_eq!(c.get(&p("f")), Some(Cached::Absent));
        c.invalidate(&p("f"));
        c.refresh(&p("f"), &grown);
        assert_eq!(c.get(&p("f")), None);
        c.put(&p("f"), &Attr { ino: 10, ..attr() });
        c.refresh(&p("f"), &grown);
        assert_eq!(c.get(&p("f")), Some(Cached::Present(Attr { ino: 10, ..attr() })));
    }

    #[test]
    fn complete_dir_answers_absent_until_it_loses_track() {
        let c = AttrCache::new(Duration::from_secs(60));
        assert_eq!(c.get(&p("d/f")), None);
        c.put_complete_dir(&p("d"));
        assert_eq!(c.get(&p("d/f")), Some(Cached::Absent));
        c.put(&p("d/f"), &attr());
        assert_eq!(c.get(&p("d/f")), Some(Cached::Present(attr())));
        // Written through us: attributes unknown, the name still listed, `d` still complete.
        c.invalidate_attr(&p("d/f"));
        assert_eq!(c.get(&p("d/f")), None);
        assert_eq!(c.get(&p("d/g")), Some(Cached::Absent));
        assert!(c.listing(&p("d")).is_none(), "a listing needs every entry's attributes");
        // A name we lose track of (an error, a rename) makes the directory unknown again.
        c.invalidate(&p("d/f"));
        assert_eq!(c.get(&p("d/g")), None);
        assert!(!c.is_complete_dir(&p("d")));
    }

    #[test]
    fn listings_follow_our_own_changes() {
        let c = AttrCache::new(Duration::from_secs(60));
        c.put_listing(&p("d"), &[entry("a"), entry("c")], c.generation());
        let names = |c: &AttrCache| c.listing(&p("d")).map(|v| v.into_iter().map(|e| e.name).collect::<Vec<_>>());
        assert_eq!(names(&c), Some(vec![b"a".to_vec(), b"c".to_vec()]));
        c.put(&p("d/b"), &attr());
        c.put_absent(&p("d/a"), None);
        assert_eq!(names(&c), Some(vec![b"b".to_vec(), b"c".to_vec()]));
        assert_eq!(c.get(&p("d/a")), Some(Cached::Absent));
        assert_eq!(c.get(&p("d/zz")), Some(Cached::Absent));
        assert_eq!(c.size(), (3, 2));
    }

    #[test]
    fn a_notice_drops_the_path_its_subtree_and_its_listing_and_stale_fetches() {
        let c = AttrCache::new(Duration::from_secs(60));
        let dir = Attr { kind: FileKind::Dir, ..attr() };
        c.put(&p("d"), &dir);
        c.put_listing(&p("d"), &[entry("x")], c.generation());
        c.put_listing(&p("d/x"), &[entry("y")], c.generation());
        c.put(&p("e"), &attr());
        let before = c.generation();
        c.changed(&[p("d/x")]);
        assert_eq!(c.get(&p("d/x")), None);
        assert_eq!(c.get(&p("d/x/y")), None);
        assert_eq!(c.get(&p("d")), None, "the parent's mtime moved");
        assert!(!c.is_complete_dir(&p("d")) && !c.is_complete_dir(&p("d/x")));
        assert_eq!(c.get(&p("e")), Some(Cached::Present(attr())));
        // A fetch that started before the notice is not stored.
        c.put_fetched(&p("d/x"), &attr(), before);
        c.put_listing(&p("d"), &[entry("x")], before);
        assert_eq!(c.get(&p("d/x")), None);
        assert!(!c.is_complete_dir(&p("d")));
        c.put_fetched(&p("d/x"), &attr(), c.generation());
        assert!(c.get(&p("d/x")).is_some());
        c.clear();
        assert_eq!(c.get(&p("e")), None);
    }

    #[test]
    fn an_unlink_behind_hides_the_name_and_stale_answers_about_its_directory() {
        let c = AttrCache::new(Duration::from_secs(60));
        c.put_listing(&p("d"), &[entry("a"), entry("b")], c.generation());
        let before = c.generation();
        c.unlink_started(&p("d/a"));
        assert_eq!(c.get(&p("d/a")), Some(Cached::Absent));
        assert_eq!(c.listing(&p("d")).map(|l| l.len()), Some(1));
        assert!(c.unlinks_pending(|d, n| *d == p("d") && n == b"a"));
        // A listing or stat asked for before (or while) the unlink is pending may hold the name.
        c.put_listing(&p("d"), &[entry("a"), entry("b")], before);
        c.put_fetched(&p("d/a"), &attr(), c.generation());
        assert_eq!(c.get(&p("d/a")), Some(Cached::Absent));
        // Another directory is not concerned.
        c.put_fetched(&p("e/a"), &attr(), before);
        assert!(c.get(&p("e/a")).is_some());
        let during = c.generation();
        c.unlink_answered(&p("d/a"), true);
        assert!(!c.unlinks_pending(|_, _| true));
        c.put_listing(&p("d"), &[entry("a"), entry("b")], during);
        assert_eq!(c.get(&p("d/a")), Some(Cached::Absent), "asked before the answer: stale");
        c.put_listing(&p("d"), &[entry("b")], c.generation());
        assert_eq!(c.listing(&p("d")).map(|l| l.len()), Some(1));
        // Pending unlinks survive a clear; a failed one forgets the name and the listing.
        c.unlink_started(&p("d/b"));
        c.clear();
        assert!(c.unlinks_pending(|_, n| n == b"b"));
        c.put_listing(&p("d"), &[entry("b")], c.generation());
        c.unlink_answered(&p("d/b"), false);
        assert_eq!(c.get(&p("d/b")), None);
        assert!(!c.is_complete_dir(&p("d")));
    }

    #[tokio::test]
    async fn waiters_wake_when_the_unlink_is_answered() {
        let c = Arc::new(AttrCache::new(Duration::from_secs(60)));
        c.unlink_started(&p("d/a"));
        let w = c.clone();
        let waiter =
            tokio::spawn(async move { w.wait_for_unlinks(Duration::from_secs(30), |d, _| *d == p("d")).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the waiter returned with the unlink pending");
        c.unlink_answered(&p("d/a"), true);
        let done = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("joined");
        assert!(done, "the wait gave up");
        assert!(c.wait_for_unlinks(Duration::from_millis(1), |_, _| true).await, "nothing pending, yet it gave up");
    }

    #[test]
    fn subdirs_after_a_name_are_the_next_directories_listed() {
        let c = AttrCache::new(Duration::from_secs(60));
        let dir = |n: &str| DirEntry { name: n.as_bytes().to_vec(), attr: Attr { kind: FileKind::Dir, ..attr() } };
        c.put_listing(&p("t"), &[dir("a"), entry("b"), dir("c"), dir("d"), dir("e")], c.generation());
        assert_eq!(c.subdirs_after(&p("t"), b"a", 2), vec![p("t/c"), p("t/d")]);
        assert_eq!(c.subdirs_after(&p("t"), b"d", 5), vec![p("t/e")]);
        assert!(c.subdirs_after(&p("u"), b"a", 5).is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let c = AttrCache::new(Duration::from_secs(60));
        let many: Vec<DirEntry> = (0..MAX_LISTED / 4).map(|i| entry(&format!("f{i}"))).collect();
        for d in 0..10 {
            c.put_listing(&p(&format!("d{d}")), &many, c.generation());
            let (entries, listed) = c.size();
            assert!(entries <= MAX_ENTRIES && listed <= MAX_LISTED, "{entries} entries, {listed} names");
        }
        assert!(c.listing(&p("d9")).is_some(), "the newest listing is kept whole");
    }

    #[test]
    fn touched_dir_keeps_its_attributes_with_new_times() {
        let c = AttrCache::new(Duration::from_secs(60));
        c.put(&p("d"), &attr());
        let now = Timestamp { secs: 100, nanos: 5 };
        c.touch_dir(&p("d"), now, 0);
        let Some(Cached::Present(a)) = c.get(&p("d")) else { panic!("attributes dropped") };
        assert_eq!((a.mtime, a.ctime, a.size, a.perm), (now, now, 3, 0o644));
        c.touch_dir(&p("e"), now, 1);
        assert_eq!(c.get(&p("e")), None);
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let c = AttrCache::new(Duration::ZERO);
        c.put(&p("a"), &attr());
        c.put_complete_dir(&p("a"));
        assert_eq!(c.get(&p("a")), None);
        assert_eq!(c.get(&p("a/b")), None);
    }
}
