//! Names: Unlink, Rename, Symlink, ReadLink, Link. Each holds the user's size lock while it
//! looks at what it removes and removes it, so the quota frees exactly what disappears (a file
//! whose last link goes) even with other requests of the user running at the same time.

use homefs_shared::{Attr, RenameFlags, WirePath};
use rustix::fs::{AtFlags, FileType, Stat};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::inline::Place;
use super::meta::attr_of;
use super::sizing::size_of;
use super::OpError;
use crate::home::{is_counted, Jail, QuotaLedger, Reservation};

/// The bytes that stop counting when this name goes: its size if it is the last link of a
/// counted inode.
fn freed_by_removing(st: &Stat) -> u64 {
    if is_counted(FileType::from_raw_mode(st.st_mode)) && st.st_nlink == 1 {
        size_of(st)
    } else {
        0
    }
}

/// Unlink: removes a name that is not a directory; frees the file's size if it was the last link.
/// `None` (nothing done) when `place` declines to free what it would ([`Place::declines`]).
pub fn unlink(jail: &Jail, quota: &Arc<dyn QuotaLedger>, path: &WirePath, place: Place) -> Result<Option<()>, OpError> {
    let (dir, name) = jail.parent(path)?;
    let _sizing = super::inline::size_lock(quota.as_ref())?;
    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if place.declines(&st) {
        return Ok(None);
    }
    rustix::fs::unlinkat(&dir, name, AtFlags::empty())?;
    quota.release(freed_by_removing(&st));
    Ok(Some(()))
}

/// Rename (`renameat2`): a file replaced at `to` is freed if that was its last link. `None`
/// (nothing done) when `place` declines to free what it would replace ([`Place::declines`]).
pub fn rename(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    from: &WirePath,
    to: &WirePath,
    flags: RenameFlags,
    place: Place,
) -> Result<Option<()>, OpError> {
    let (from_dir, from_name) = jail.parent(from)?;
    let (to_dir, to_name) = jail.parent(to)?;
    let mut how = rustix::fs::RenameFlags::empty();
    if flags.noreplace {
        how |= rustix::fs::RenameFlags::NOREPLACE;
    }
    if flags.exchange {
        how |= rustix::fs::RenameFlags::EXCHANGE;
    }
    let _sizing = super::inline::size_lock(quota.as_ref())?;
    // What a plain rename replaces (an exchange keeps both, a no-replace one replaces nothing).
    let replaced =
        if how.is_empty() { rustix::fs::statat(&to_dir, to_name, AtFlags::SYMLINK_NOFOLLOW).ok() } else { None };
    if replaced.as_ref().is_some_and(|old| place.declines(old)) {
        return Ok(None);
    }
    let source = rustix::fs::statat(&from_dir, from_name, AtFlags::SYMLINK_NOFOLLOW)?;
    rustix::fs::renameat_with(&from_dir, from_name, &to_dir, to_name, how)?;
    if let Some(old) = replaced {
        // Renaming a name onto another link of the same inode changes nothing.
        if (old.st_dev, old.st_ino) != (source.st_dev, source.st_ino) {
            quota.release(freed_by_removing(&old));
        }
    }
    Ok(Some(()))
}

/// Symlink: stores `target` as given (it is only ever followed inside the jail). Its size, the
/// target's length, counts towards the quota.
pub fn symlink(jail: &Jail, quota: &Arc<dyn QuotaLedger>, target: &[u8], path: &WirePath) -> Result<Attr, OpError> {
    if target.is_empty() || target.contains(&0) {
        return Err(homefs_shared::ErrorCode::Invalid.into());
    }
    if target.len() > homefs_shared::path::MAX_PATH_BYTES {
        return Err(homefs_shared::ErrorCode::NameTooLong.into());
    }
    let (dir, name) = jail.parent(path)?;
    let _sizing = super::inline::size_lock(quota.as_ref())?;
    let reservation = Reservation::new(quota, target.len() as u64)?;
    rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, name)?;
    // A symlink's apparent size is its target's length.
    reservation.settle(target.len() as u64);
    Ok(attr_of(&rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?))
}

/// ReadLink: the target as stored.
pub fn read_link(jail: &Jail, path: &WirePath) -> Result<Vec<u8>, OpError> {
    let (dir, name) = jail.parent(path)?;
    Ok(rustix::fs::readlinkat(&dir, name, Vec::new())?.into_bytes())
}

/// Link: a hard link `to` to the file at `from`, which is not followed if it is a symlink
/// (`linkat` without `AT_SYMLINK_FOLLOW`), so both ends are in the jail. The inode is already
/// counted once, so the quota does not change.
pub fn link(jail: &Jail, quota: &Arc<dyn QuotaLedger>, from: &WirePath, to: &WirePath) -> Result<Attr, OpError> {
    let (from_dir, from_name) = jail.parent(from)?;
    let (to_dir, to_name) = jail.parent(to)?;
    // Held so that an Unlink of the other name cannot see a stale link count.
    let _sizing = super::inline::size_lock(quota.as_ref())?;
    rustix::fs::linkat(&from_dir, from_name, &to_dir, to_name, AtFlags::empty())?;
    Ok(attr_of(&rustix::fs::statat(&to_dir, to_name, AtFlags::SYMLINK_NOFOLLOW)?))
}
