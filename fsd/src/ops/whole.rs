//! Whole-file requests: PutFile (a small file stored in one request under a temporary name and
//! renamed into place), GetFile (a small file read in one request) and SyncFs (one `syncfs` for
//! everything written before it, instead of a sync per file).

use bytes::{Bytes, BytesMut};
use homefs_shared::{Attr, ErrorCode, FileKind, Timestamp, WirePath, MAX_DATA_BYTES};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use super::meta::{attr_of, CLIENT_MODE_BITS};
use super::sizing::size_of;
use super::OpError;
use crate::home::{is_counted, Jail, QuotaLedger, Reservation};

/// The suffix of a PutFile's temporary name (as netcp's partial files: one kind of leftover).
const TEMP_SUFFIX: &[u8] = b".homefs-part";
/// Random hex digits in a temporary name (12, not the 16 of netcp's partial-file tags, so that
/// netcp's sweep of stale partial files never takes a temporary file of a put in progress).
const TEMP_RANDOM_HEX: usize = 12;
/// The longest name (bytes) of one path component.
const NAME_MAX: usize = homefs_shared::path::MAX_NAME_BYTES;

/// `.NAME.RANDOM.homefs-part` beside the target; a name too long for that is replaced by a hash.
fn temp_name(name: &[u8]) -> OsString {
    let mut v = vec![b'.'];
    if name.len() + 2 + TEMP_RANDOM_HEX + TEMP_SUFFIX.len() > NAME_MAX {
        v.extend_from_slice(blake3::hash(name).to_hex()[..32].as_bytes());
    } else {
        v.extend_from_slice(name);
    }
    v.push(b'.');
    let random = format!("{:016x}", rand::random::<u64>());
    v.extend_from_slice(&random.as_bytes()[..TEMP_RANDOM_HEX]);
    v.extend_from_slice(TEMP_SUFFIX);
    OsString::from_vec(v)
}

/// The bytes that stop counting when the name that `st` describes is replaced.
fn freed_by_replacing(st: &Stat) -> u64 {
    if is_counted(FileType::from_raw_mode(st.st_mode)) && st.st_nlink == 1 {
        size_of(st)
    } else {
        0
    }
}

/// PutFile: `data` becomes the content of `path` (symlinks in the parent's path are followed inside
/// the jail; the last name is replaced, never followed). Returns the BLAKE3 of `data` and the
/// attributes of the new file. On any error the temporary file is removed and nothing is charged.
pub fn put_file(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    path: &WirePath,
    mode: u32,
    mtime: Option<Timestamp>,
    exclusive: bool,
    data: &[u8],
) -> Result<([u8; 32], Attr), OpError> {
    if data.len() > MAX_DATA_BYTES as usize {
        return Err(ErrorCode::TooBig.into());
    }
    let (dir, name) = jail.parent(path)?;
    if name == OsStr::new(".") {
        // The home itself.
        return Err(ErrorCode::IsDir.into());
    }
    let temp = temp_name(name.as_bytes());
    let len = data.len() as u64;
    // Held from the look at what is replaced to the rename, as a write holds it from its fstat to
    // its settle: the net growth is charged (a replaced file gives its size back), exactly.
    let sizing = quota.size_lock();
    let replaced = if exclusive { None } else { rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).ok() };
    let freed = replaced.as_ref().map_or(0, freed_by_replacing);
    // Charged before the temporary file exists, refunded on drop unless settled.
    let reservation = Reservation::new(quota, len.saturating_sub(freed))?;
    let fd = rustix::fs::openat(
        &dir,
        &temp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let stored = store(&fd, &dir, &temp, name, mode, mtime, exclusive, data);
    if let Ok(st) = &stored {
        reservation.settle(size_of(st));
        if let Some(old) = replaced {
            // Renaming onto another link of the same inode frees nothing.
            if (old.st_dev, old.st_ino) != (st.st_dev, st.st_ino) {
                quota.release(freed);
            }
        }
    }
    drop(sizing);
    if stored.is_err() {
        // Best effort: the name is ours (random, created exclusively).
        let _ = rustix::fs::unlinkat(&dir, &temp, AtFlags::empty());
    }
    let st = stored?;
    Ok((*blake3::hash(data).as_bytes(), attr_of(&st)))
}

/// Writes, sets mode and mtime, and renames into place; returns the file's stat.
#[allow(clippy::too_many_arguments)]
fn store(
    fd: &OwnedFd,
    dir: &OwnedFd,
    temp: &OsStr,
    name: &OsStr,
    mode: u32,
    mtime: Option<Timestamp>,
    exclusive: bool,
    data: &[u8],
) -> Result<Stat, OpError> {
    write_all(fd.as_fd(), data)?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & CLIENT_MODE_BITS))?;
    if let Some(t) = mtime {
        let ts = Timestamps {
            last_access: Timespec { tv_sec: rustix::fs::UTIME_OMIT, tv_nsec: rustix::fs::UTIME_OMIT },
            last_modification: Timespec { tv_sec: t.secs, tv_nsec: i64::from(t.nanos) },
        };
        rustix::fs::futimens(fd, &ts)?;
    }
    let how = if exclusive { rustix::fs::RenameFlags::NOREPLACE } else { rustix::fs::RenameFlags::empty() };
    rustix::fs::renameat_with(dir, temp, dir, name, how)?;
    Ok(rustix::fs::fstat(fd)?)
}

fn write_all(fd: BorrowedFd<'_>, data: &[u8]) -> Result<(), OpError> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::write(fd, &data[done..]) {
            Ok(0) => return Err(ErrorCode::NoSpace.into()),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// GetFile: the attributes of the file at `path` (symlinks followed inside the jail), the first
/// `min(size, max_len, MAX_DATA_BYTES)` bytes of a regular file (nothing for other kinds) and the
/// BLAKE3 of the bytes sent. One open, fstat, read, close.
pub fn get_file(jail: &Jail, path: &WirePath, max_len: u32) -> Result<(Attr, [u8; 32], Bytes), OpError> {
    let fd = jail.open(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY, Mode::empty())?;
    let attr = attr_of(&rustix::fs::fstat(&fd)?);
    if attr.kind != FileKind::File {
        return Ok((attr, *blake3::hash(&[]).as_bytes(), Bytes::new()));
    }
    let want = usize::try_from(attr.size.min(u64::from(max_len.min(MAX_DATA_BYTES)))).unwrap_or(0);
    let mut buf = BytesMut::zeroed(want);
    let mut done = 0;
    while done < want {
        match rustix::io::pread(&fd, &mut buf[done..], done as u64) {
            // The file shrank after the fstat: what was there is sent; the client sees fewer bytes.
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(done);
    let hash = *blake3::hash(&buf).as_bytes();
    Ok((attr, hash, buf.freeze()))
}

/// SyncFs: `syncfs(2)` of the file system holding the home.
pub fn sync_fs(jail: &Jail) -> Result<(), OpError> {
    rustix::fs::syncfs(jail.dir())?;
    Ok(())
}
