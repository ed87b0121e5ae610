//! The client's own file handles: each maps to the path, flags and mode it was opened with, and
//! the server's handle on the connection (epoch) where it was last opened. After a reconnect the
//! server handle is gone; the file is reopened by path on first use. A rename through this client
//! moves the paths of open handles at or below its source, so a reopen finds the file.

use homefs_shared::{Fh, OpenFlags, WirePath};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// What an operation on a handle must do on a given connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The server's handle on this connection.
    Ready(Fh),
    /// Open it again on this connection with these arguments.
    Reopen { path: WirePath, flags: OpenFlags, mode: u32 },
    /// It could not be reopened once: it never will be.
    Stale,
    /// Not a handle of this client (or already closed).
    Unknown,
}

struct OpenFile {
    path: WirePath,
    /// The flags to reopen with: as opened, minus create, exclusive and truncate (reopening
    /// must neither create a file the user deleted nor cut one the user wrote).
    flags: OpenFlags,
    mode: u32,
    /// The server's handle and the epoch of the connection it belongs to.
    server: Option<(u64, Fh)>,
    stale: bool,
}

/// The table of open handles. The one lock guards `next` and `open`; it is never held across an
/// await.
#[derive(Default)]
pub(crate) struct Handles {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// The next client handle number; numbers are never reused.
    next: u64,
    open: HashMap<u64, OpenFile>,
}

impl Handles {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Each critical section is a single insert, lookup or loop of assignments: a panic in one
        // cannot leave the table half-changed in a way that matters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a file opened on connection `epoch` and returns the client's handle for it.
    pub(crate) fn insert(&self, path: WirePath, flags: OpenFlags, mode: u32, epoch: u64, server: Fh) -> Fh {
        let flags = OpenFlags { create: false, exclusive: false, truncate: false, ..flags };
        let mut t = self.table();
        t.next += 1;
        let fh = t.next;
        t.open.insert(fh, OpenFile { path, flags, mode, server: Some((epoch, server)), stale: false });
        Fh(fh)
    }

    /// What to do with `fh` on connection `epoch`.
    pub(crate) fn lookup(&self, fh: Fh, epoch: u64) -> Lookup {
        let t = self.table();
        match t.open.get(&fh.0) {
            None => Lookup::Unknown,
            Some(f) if f.stale => Lookup::Stale,
            Some(OpenFile { server: Some((e, s)), .. }) if *e == epoch => Lookup::Ready(*s),
            Some(f) => Lookup::Reopen { path: f.path.clone(), flags: f.flags, mode: f.mode },
        }
    }

    /// Records a reopen on `epoch`. Returns the server handle to use and, when another task
    /// reopened the same file on this epoch first, the extra one to close.
    pub(crate) fn reopened(&self, fh: Fh, epoch: u64, server: Fh) -> Option<(Fh, Option<Fh>)> {
        let mut t = self.table();
        let f = t.open.get_mut(&fh.0)?;
        match f.server {
            Some((e, theirs)) if e == epoch => Some((theirs, Some(server))),
            _ => {
                f.server = Some((epoch, server));
                Some((server, None))
            }
        }
    }

    /// Marks a handle that could not be reopened.
    pub(crate) fn mark_stale(&self, fh: Fh) {
        if let Some(f) = self.table().open.get_mut(&fh.0) {
            f.stale = true;
        }
    }

    /// Forgets a handle; returns its server handle and epoch, if it had one.
    pub(crate) fn remove(&self, fh: Fh) -> Option<Option<(u64, Fh)>> {
        self.table().open.remove(&fh.0).map(|f| f.server)
    }

    /// After a rename `from` → `to` (both ways with `exchange`), moves the paths of open handles
    /// at or below them.
    pub(crate) fn renamed(&self, from: &WirePath, to: &WirePath, exchange: bool) {
        let from_c: Vec<&[u8]> = from.components().collect();
        let to_c: Vec<&[u8]> = to.components().collect();
        let mut t = self.table();
        for f in t.open.values_mut() {
            let moved = rebase(&f.path, &from_c, &to_c).or_else(|| match exchange {
                true => rebase(&f.path, &to_c, &from_c),
                false => None,
            });
            if let Some(p) = moved {
                f.path = p;
            }
        }
    }

    /// How many handles are open (for tests and diagnostics).
    pub(crate) fn len(&self) -> usize {
        self.table().open.len()
    }
}

/// `path` with its leading components `old` replaced by `new`, if it is at or below `old`.
fn rebase(path: &WirePath, old: &[&[u8]], new: &[&[u8]]) -> Option<WirePath> {
    let comps: Vec<&[u8]> = path.components().collect();
    if comps.len() < old.len() || comps[..old.len()] != *old {
        return None;
    }
    let joined: Vec<&[u8]> = new.iter().chain(&comps[old.len()..]).copied().collect();
    if joined.is_empty() {
        return Some(WirePath::root());
    }
    WirePath::new(joined.join(&b'/')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> WirePath {
        WirePath::new(s).unwrap()
    }

    #[test]
    fn reopen_after_new_epoch() {
        let h = Handles::default();
        let flags = OpenFlags { read: true, write: true, create: true, truncate: true, ..Default::default() };
        let fh = h.insert(p("a/f"), flags, 0o644, 0, Fh(7));
        assert_eq!(h.lookup(fh, 0), Lookup::Ready(Fh(7)));
        let Lookup::Reopen { path, flags, .. } = h.lookup(fh, 1) else { panic!("expected a reopen") };
        assert_eq!(path, p("a/f"));
        assert!(flags.read && flags.write && !flags.create && !flags.truncate);
        assert_eq!(h.reopened(fh, 1, Fh(3)), Some((Fh(3), None)));
        assert_eq!(h.reopened(fh, 1, Fh(4)), Some((Fh(3), Some(Fh(4)))));
        assert_eq!(h.lookup(fh, 1), Lookup::Ready(Fh(3)));
        h.mark_stale(fh);
        assert_eq!(h.lookup(fh, 2), Lookup::Stale);
        assert!(h.remove(fh).is_some());
        assert_eq!(h.lookup(fh, 2), Lookup::Unknown);
    }

    #[test]
    fn rename_moves_paths_below() {
        let h = Handles::default();
        let a = h.insert(p("d/x"), OpenFlags::default(), 0, 0, Fh(1));
        let b = h.insert(p("d2/y"), OpenFlags::default(), 0, 0, Fh(2));
        let c = h.insert(p("d"), OpenFlags::default(), 0, 0, Fh(3));
        h.renamed(&p("d"), &p("e/f"), false);
        let path = |fh| match h.lookup(fh, 9) {
            Lookup::Reopen { path, .. } => path,
            other => panic!("{other:?}"),
        };
        assert_eq!(path(a), p("e/f/x"));
        assert_eq!(path(b), p("d2/y"));
        assert_eq!(path(c), p("e/f"));
        h.renamed(&p("e/f"), &p("d2"), true);
        assert_eq!(path(a), p("d2/x"));
        assert_eq!(path(b), p("e/f/y"));
    }
}
