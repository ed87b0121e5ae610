//! The inode table: FUSE inode numbers <-> paths in the home (the server speaks paths), with the
//! kernel's lookup counts, `forget`, and the path changes that rename and unlink make.
//!
//! A FUSE inode number is the server's `ino` (stable while the file exists), except that the
//! home itself must be inode 1 for the kernel: the home's server ino and ino 1 swap places, which
//! keeps the mapping one-to-one. Hard links share one inode and one entry; its path is the one
//! most recently looked up.
//!
//! A file answered by create-behind (`creates.rs`) gets a provisional number from
//! [`PROVISIONAL_BASE`] up, the kernel's inode while it is pending. Once the server has it, the
//! server's number is an *alias* of the provisional one, which stays the kernel's number and the
//! `st_ino` users see for the life of the mount, also after the kernel forgot the inode: a
//! descriptor and its path must agree (sqlite checks), and git keeps `st_ino` in its index and
//! reads a file again when it changes. Another mount, or this one remounted, shows the server's
//! number (git then reads each such file once more). At most [`MAX_ALIASES`]; past it, those whose
//! inode the kernel does not hold go (half of them).
//! Server numbers in the
//! provisional range are not expected (ext4 numbers are 32-bit, btrfs, xfs and tmpfs count up
//! from small numbers); should one appear, [`InodeTable::provisional_clash`] turns create-behind
//! off for the mount.

use homefs_shared::{Attr, WirePath};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The FUSE inode number of the mount's root.
pub const ROOT_INO: u64 = 1;
/// The first provisional number (FUSE inodes and file handles of files answered by
/// create-behind): the top half of the range, which neither the server's inode numbers nor the
/// client's handle numbers (counted up from 1) reach.
pub const PROVISIONAL_BASE: u64 = 1 << 63;

/// Server inode numbers kept as aliases of provisional ones (about 40 bytes each: ~4 MiB).
pub const MAX_ALIASES: usize = 100_000;

/// Whether `n` is a provisional inode or handle number.
pub fn is_provisional(n: u64) -> bool {
    n >= PROVISIONAL_BASE
}

/// One inode the kernel knows about.
#[derive(Debug, Clone)]
struct Node {
    /// A path that reaches it (the latest one looked up).
    path: WirePath,
    /// Lookups the kernel has not yet forgotten.
    lookups: u64,
    /// The attributes last seen from the server, kept past the cache TTL: `open` compares them
    /// with fresh ones to decide whether the kernel's page cache is still good, and a file that
    /// was unlinked while open answers `fstat` from them.
    attr: Option<Attr>,
    /// Its path was unlinked or replaced through this mount; it lives on only while open.
    unlinked: bool,
}

/// Inode numbers and their paths. One short `std::sync::Mutex` section per call, never held
/// across an `.await`.
#[derive(Debug)]
pub struct InodeTable {
    /// The home's server inode number (swapped with [`ROOT_INO`]).
    root_server_ino: u64,
    /// Guards every node; keyed by FUSE inode number.
    nodes: Mutex<HashMap<u64, Node>>,
    /// Guards the provisional numbers the kernel holds, and the server files they shadow.
    provisional: Mutex<Provisional>,
    /// How many provisional numbers the kernel holds or are aliased (no lock taken when none).
    provisional_live: AtomicUsize,
    /// The highest provisional number given out so far.
    provisional_top: AtomicU64,
    /// A server inode number fell in the provisional range (see the module doc).
    clash: AtomicBool,
}

/// The provisional inode numbers the kernel holds, and the server files they shadow.
#[derive(Debug, Default)]
struct Provisional {
    live: HashSet<u64>,
    /// Provisional number -> the server's number of the stored file.
    shadows: HashMap<u64, u64>,
    /// The server's number -> the provisional one that is its kernel inode (see the module doc;
    /// kept after the kernel forgets it).
    aliases: HashMap<u64, u64>,
    /// The server's number -> the provisional inode shadowing it.
    shadowed: HashMap<u64, u64>,
}

impl InodeTable {
    /// A table holding only the root, whose server attributes are `root`.
    pub fn new(root: &Attr) -> InodeTable {
        let mut nodes = HashMap::new();
        let root_node = Node { path: WirePath::root(), lookups: 1, attr: Some(*root), unlinked: false };
        nodes.insert(ROOT_INO, root_node);
        InodeTable {
            root_server_ino: root.ino,
            nodes: Mutex::new(nodes),
            provisional: Mutex::new(Provisional::default()),
            provisional_live: AtomicUsize::new(0),
            provisional_top: AtomicU64::new(0),
            clash: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Node>> {
        // A panic while holding this lock leaves plain data behind, still consistent enough
        // to use: recover it rather than take the whole mount down.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn provisional(&self) -> std::sync::MutexGuard<'_, Provisional> {
        self.provisional.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ino` (from [`PROVISIONAL_BASE`] up) is now the kernel's number of a file not yet stored.
    pub fn add_provisional(&self, ino: u64) {
        self.provisional_top.fetch_max(ino, Ordering::AcqRel);
        let mut p = self.provisional();
        if p.live.insert(ino) {
            self.provisional_live.store(p.live.len() + p.aliases.len(), Ordering::Release);
        }
    }

    /// The file of provisional inode `ino` was stored as the server's `server_ino`: `ino` is its
    /// number from now on (see the module doc).
    pub fn alias(&self, server_ino: u64, ino: u64) {
        let mut p = self.provisional();
        if p.aliases.len() >= MAX_ALIASES {
            let held: HashSet<u64> = self.lock().keys().copied().filter(|i| is_provisional(*i)).collect();
            let mut n = 0u64;
            p.aliases.retain(|_, v| {
                n += 1;
                held.contains(v) || n % 2 == 0
            });
        }
        p.aliases.insert(server_ino, ino);
        if p.live.contains(&ino) {
            p.shadows.insert(ino, server_ino);
            p.shadowed.insert(server_ino, ino);
        }
        self.provisional_live.store(p.live.len() + p.aliases.len(), Ordering::Release);
    }

    /// Whether FUSE inode `ino` is the server's file `server_ino` (its own number, or a
    /// provisional inode shadowing it).
    pub fn is(&self, ino: u64, server_ino: u64) -> bool {
        self.fuse_ino(server_ino) == ino
            || (is_provisional(ino)
                && self.provisional_live.load(Ordering::Acquire) > 0
                && self.provisional().shadows.get(&ino) == Some(&server_ino))
    }

    /// The provisional inode shadowing the server's file `server_ino`, if the kernel holds one
    /// (descriptors opened at its create may still be open on it).
    pub fn shadow_of(&self, server_ino: u64) -> Option<u64> {
        if self.provisional_live.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.provisional().shadowed.get(&server_ino).copied()
    }

    /// Whether a server inode number fell in the provisional range (create-behind is then off).
    pub fn provisional_clash(&self) -> bool {
        self.clash.load(Ordering::Acquire)
    }

    /// The kernel forgot provisional inode `ino`.
    fn forget_provisional(&self, ino: u64) {
        let mut p = self.provisional();
        if p.live.remove(&ino) {
            if let Some(server_ino) = p.shadows.remove(&ino) {
                p.shadowed.remove(&server_ino);
            }
            self.provisional_live.store(p.live.len() + p.aliases.len(), Ordering::Release);
        }
    }

    /// The FUSE inode number for a server inode number.
    pub fn fuse_ino(&self, server_ino: u64) -> u64 {
        if server_ino == self.root_server_ino {
            return ROOT_INO;
        } else if server_ino == ROOT_INO {
            return self.root_server_ino;
        }
        if self.provisional_live.load(Ordering::Acquire) > 0 {
            let p = self.provisional();
            if let Some(ino) = p.aliases.get(&server_ino) {
                return *ino;
            }
            if p.live.contains(&server_ino) {
                return server_ino;
            }
        }
        // One of ours given out before (a listing taken while it was pending) is not a clash.
        let ours = server_ino <= self.provisional_top.load(Ordering::Acquire);
        if is_provisional(server_ino) && !ours && !self.clash.swap(true, Ordering::AcqRel) {
            tracing::warn!(server_ino, "the server uses inode numbers in the provisional range: create-behind off");
        }
        server_ino
    }

    /// The path of an inode the kernel knows, if any.
    pub fn path(&self, ino: u64) -> Option<WirePath> {
        self.lock().get(&ino).map(|n| n.path.clone())
    }

    /// Whether the inode's path was unlinked through this mount.
    pub fn is_unlinked(&self, ino: u64) -> bool {
        self.lock().get(&ino).is_some_and(|n| n.unlinked)
    }

    /// Whether the kernel's inode `ino`, listed as `path` by a listing taken earlier, is known not
    /// to be there now: unlinked or replaced at `path` through this mount, or (`one_name`: a
    /// directory, or a file of one link) known by another name, renamed away.
    pub fn gone_from(&self, ino: u64, path: &WirePath, one_name: bool) -> bool {
        self.lock().get(&ino).is_some_and(|n| if n.path == *path { n.unlinked } else { one_name })
    }

    /// The attributes last seen for the inode.
    pub fn last_attr(&self, ino: u64) -> Option<Attr> {
        self.lock().get(&ino).and_then(|n| n.attr)
    }

    /// Records fresh attributes of a known inode; returns the ones they replace.
    pub fn update_attr(&self, ino: u64, attr: &Attr) -> Option<Attr> {
        self.lock().get_mut(&ino).and_then(|n| n.attr.replace(*attr))
    }

    /// The kernel learned of `path` (lookup, create, mkdir, readdirplus...): one more lookup on
    /// its inode, whose path and attributes are brought up to date. Returns the FUSE inode number.
    pub fn remember(&self, path: &WirePath, attr: &Attr) -> u64 {
        let ino = self.fuse_ino(attr.ino);
        let mut nodes = self.lock();
        let node =
            nodes.entry(ino).or_insert_with(|| Node { path: path.clone(), lookups: 0, attr: None, unlinked: false });
        if ino != ROOT_INO {
            node.path = path.clone();
            node.lookups += 1;
        }
        node.attr = Some(*attr);
        node.unlinked = false;
        ino
    }

    /// The kernel forgot `n` lookups of `ino`; the entry goes when none remain.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = self.lock();
        if let Some(node) = nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                nodes.remove(&ino);
                drop(nodes);
                if is_provisional(ino) {
                    self.forget_provisional(ino);
                }
            }
        }
    }

    /// `path` was unlinked or removed through this mount.
    pub fn unlinked(&self, path: &WirePath) {
        for node in self.lock().values_mut() {
            if node.path == *path {
                node.unlinked = true;
            }
        }
    }

    /// `path`, known to name inode `ino`, was unlinked through this mount (no scan of the table).
    /// Returns whether the table had `ino` at `path`.
    pub fn unlinked_ino(&self, ino: u64, path: &WirePath) -> bool {
        match self.lock().get_mut(&ino).filter(|n| n.path == *path) {
            Some(node) => {
                node.unlinked = true;
                true
            }
            None => false,
        }
    }

    /// `from` was renamed to `to` (which it replaced, if it existed): paths at or below `from`
    /// move below `to`.
    pub fn renamed(&self, from: &WirePath, to: &WirePath) {
        let mut nodes = self.lock();
        for node in nodes.values_mut() {
            if is_within(&node.path, to) && !is_within(&node.path, from) {
                node.unlinked = true;
            }
        }
        for node in nodes.values_mut() {
            if let Some(moved) = rebase(&node.path, from, to) {
                node.path = moved;
            }
        }
    }

    /// `a` and `b` were swapped (`RENAME_EXCHANGE`).
    pub fn exchanged(&self, a: &WirePath, b: &WirePath) {
        for node in self.lock().values_mut() {
            if let Some(moved) = rebase(&node.path, a, b) {
                node.path = moved;
            } else if let Some(moved) = rebase(&node.path, b, a) {
                node.path = moved;
            }
        }
    }

    /// The inodes of those of `paths` the kernel knows, found in one pass.
    pub fn inos_of(&self, paths: &HashSet<WirePath>) -> HashMap<WirePath, u64> {
        let nodes = self.lock();
        let mut found = HashMap::new();
        if paths.contains(&WirePath::root()) {
            found.insert(WirePath::root(), ROOT_INO);
        }
        for (ino, node) in nodes.iter() {
            if *ino != ROOT_INO && paths.contains(&node.path) {
                found.insert(node.path.clone(), *ino);
            }
        }
        found
    }

    /// Every inode the kernel holds, with its path.
    pub fn all(&self) -> Vec<(u64, WirePath)> {
        self.lock().iter().map(|(ino, n)| (*ino, n.path.clone())).collect()
    }

    /// How many inodes the kernel holds (for tests and the debug log).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether only the root is known.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }
}

/// Whether `path` is `dir` or below it.
pub(super) fn is_within(path: &WirePath, dir: &WirePath) -> bool {
    if dir.is_root() {
        return true;
    }
    let (p, d) = (path.as_bytes(), dir.as_bytes());
    p.starts_with(d) && (p.len() == d.len() || p[d.len()] == b'/')
}

/// `path` with its prefix `from` replaced by `to`, if it lies within `from`.
fn rebase(path: &WirePath, from: &WirePath, to: &WirePath) -> Option<WirePath> {
    if from.is_root() || !is_within(path, from) {
        return None;
    }
    let rest = &path.as_bytes()[from.as_bytes().len()..];
    let mut bytes = to.as_bytes().to_vec();
    bytes.extend_from_slice(rest);
    WirePath::new(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use homefs_shared::{FileKind, Timestamp};

    fn attr(ino: u64) -> Attr {
        let t = Timestamp::default();
        Attr { ino, kind: FileKind::File, perm: 0o644, nlink: 1, size: 0, blocks: 0, atime: t, mtime: t, ctime: t }
    }
    fn p(s: &str) -> WirePath {
        WirePath::new(s).unwrap()
    }

    #[test]
    fn root_swaps_with_ino_one() {
        let t = InodeTable::new(&attr(77));
        assert_eq!(t.fuse_ino(77), ROOT_INO);
        assert_eq!(t.fuse_ino(1), 77);
        assert_eq!(t.fuse_ino(5), 5);
        assert_eq!(t.path(ROOT_INO), Some(WirePath::root()));
    }

    #[test]
    fn lookups_and_forget() {
        let t = InodeTable::new(&attr(77));
        assert_eq!(t.remember(&p("a"), &attr(5)), 5);
        assert_eq!(t.remember(&p("a"), &attr(5)), 5);
        t.forget(5, 1);
        assert_eq!(t.path(5), Some(p("a")));
        t.forget(5, 1);
        assert_eq!(t.path(5), None);
        t.forget(ROOT_INO, 10);
        assert!(t.path(ROOT_INO).is_some());
    }

    #[test]
    fn a_stored_file_keeps_its_provisional_number_for_the_mount() {
        let t = InodeTable::new(&attr(77));
        let ino = PROVISIONAL_BASE + 3;
        t.add_provisional(ino);
        assert_eq!(t.remember(&p("f"), &attr(ino)), ino);
        t.alias(40, ino);
        assert!(t.is(ino, 40) && !t.is(ino, 41));
        assert_eq!(t.shadow_of(40), Some(ino));
        assert_eq!(t.remember(&p("f"), &attr(40)), ino, "the server's number maps to the kernel's");
        t.forget(ino, 2);
        assert_eq!(t.shadow_of(40), None);
        assert_eq!(t.fuse_ino(40), ino, "forgotten by the kernel: still the number users saw");
        assert_eq!(t.remember(&p("f"), &attr(40)), ino);
        assert!(!t.provisional_clash(), "one of ours, seen again, is not a clash");
        assert_eq!(t.fuse_ino(ino + 1), ino + 1);
        assert!(t.provisional_clash(), "a server number in the range turns create-behind off");
    }

    #[test]
    fn rename_moves_subtrees_and_marks_replaced() {
        let t = InodeTable::new(&attr(77));
        t.remember(&p("d"), &attr(2));
        t.remember(&p("d/x"), &attr(3));
        t.remember(&p("dx"), &attr(4));
        t.remember(&p("e"), &attr(5));
        t.renamed(&p("d"), &p("e"));
        assert_eq!(t.path(2), Some(p("e")));
        assert_eq!(t.path(3), Some(p("e/x")));
        assert_eq!(t.path(4), Some(p("dx")));
        assert!(t.is_unlinked(5) && !t.is_unlinked(2));
        t.exchanged(&p("e/x"), &p("dx"));
        assert_eq!(t.path(3), Some(p("dx")));
        assert_eq!(t.path(4), Some(p("e/x")));
    }

    #[test]
    fn gone_from_a_listing_taken_before_unlinks_and_renames() {
        let t = InodeTable::new(&attr(77));
        t.remember(&p("a"), &attr(2));
        t.remember(&p("b"), &attr(3));
        assert!(!t.gone_from(2, &p("a"), true), "still there");
        assert!(!t.gone_from(9, &p("z"), true), "unknown to the kernel: not known gone");
        t.unlinked(&p("a"));
        assert!(t.gone_from(2, &p("a"), true) && t.gone_from(2, &p("a"), false), "unlinked");
        t.renamed(&p("b"), &p("c"));
        assert!(t.gone_from(3, &p("b"), true), "renamed away");
        assert!(!t.gone_from(3, &p("b"), false), "one of several names: kept");
        assert!(!t.gone_from(3, &p("c"), true), "its new name");
    }
}
