//! Directories: ReadDir (stateless, sorted pages with attributes), Mkdir, Rmdir.

use homefs_shared::{Attr, DirEntry, WirePath};
use rustix::fs::{AtFlags, Dir, Mode, OFlags};
use rustix::io::Errno;
use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::meta::{attr_of, CLIENT_MODE_BITS};
use super::OpError;
use crate::home::Jail;

/// Most entries in one page, whatever the client asks for.
pub const MAX_PAGE_ENTRIES: u32 = 4096;

/// Most encoded bytes of entries in one page: well under `MAX_HEADER_BYTES` (256 KiB), leaving
/// room for the header around them and for the estimate below being a little off.
pub const MAX_PAGE_BYTES: usize = 200 << 10;

/// An upper bound of one entry's postcard size besides its name: the name's length prefix and
/// the attributes' varints (at most 10 bytes per u64) come to under 100 bytes.
const ENTRY_OVERHEAD: usize = 100;

/// ReadDir: the entries of `path` (following symlinks in the jail) whose names sort bytewise
/// after `after`, with their attributes, and whether more remain. Each page reads the directory
/// again, so paging needs no server state and survives a reconnect. An entry that vanishes
/// between listing and stat is skipped.
pub fn read_dir(
    jail: &Jail,
    path: &WirePath,
    after: Option<&[u8]>,
    max_entries: u32,
) -> Result<(Vec<DirEntry>, bool), OpError> {
    let fd = jail.open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut dir = Dir::new(fd)?;
    let max = max_entries.clamp(1, MAX_PAGE_ENTRIES) as usize;
    // Only the `max + 1` smallest names after `after` are kept (the max-heap evicts its largest),
    // so a page of a huge directory holds one page of names, not the whole directory; the one
    // extra name tells whether more remain.
    let mut smallest: BinaryHeap<Vec<u8>> = BinaryHeap::with_capacity(max + 2);
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || after.is_some_and(|a| name <= a) {
            continue;
        }
        if smallest.len() > max && smallest.peek().is_some_and(|largest| name >= largest.as_slice()) {
            continue;
        }
        smallest.push(name.to_vec());
        if smallest.len() > max + 1 {
            smallest.pop();
        }
    }
    let names = smallest.into_sorted_vec();
    let dirfd = dir.fd()?;
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut rest = names.into_iter();
    for name in rest.by_ref() {
        let st = match rustix::fs::statat(dirfd, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        bytes += name.len() + ENTRY_OVERHEAD;
        entries.push(DirEntry { name, attr: attr_of(&st) });
        if entries.len() >= max || bytes + MAX_NAME_ENTRY > MAX_PAGE_BYTES {
            break;
        }
    }
    // Entries that vanish later are skipped by the next page, so "more" may be a page that
    // turns out empty; the client then stops on `more == false`.
    let more = rest.next().is_some();
    Ok((entries, more))
}

/// The largest one entry can be, so a page stops before an entry could push it over its bound.
const MAX_NAME_ENTRY: usize = homefs_shared::path::MAX_NAME_BYTES + ENTRY_OVERHEAD;

/// Mkdir: creates the directory (mode as given, less the server's umask) and returns its attributes.
pub fn mkdir(jail: &Jail, path: &WirePath, mode: u32) -> Result<Attr, OpError> {
    let (dir, name) = jail.parent(path)?;
    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode & CLIENT_MODE_BITS))?;
    Ok(attr_of(&rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?))
}

/// Rmdir: removes an empty directory. Directories are not counted by the quota.
pub fn rmdir(jail: &Jail, path: &WirePath) -> Result<(), OpError> {
    let (dir, name) = jail.parent(path)?;
    rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}
