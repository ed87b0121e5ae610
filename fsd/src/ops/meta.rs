//! Attributes: Stat (lstat), SetAttr (mode, size, times) and StatFs (the quota as a file system).

use homefs_shared::{Attr, FileKind, SetAttr, SetTime, StatFs, Timestamp, WirePath};
use nix::sys::stat::FchmodatFlags;
use rustix::fs::Timespec;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timestamps};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::handles::Handle;
use super::sizing::{change_size, size_of};
use super::OpError;
use crate::home::{Jail, QuotaLedger};

/// Reported as the preferred I/O size: the mount's request size (1 MiB), so tools that size their
/// buffers from `st_blksize`/`f_bsize` make requests of a size that fills one round trip.
pub const BLOCK_SIZE: u32 = 1 << 20;

/// The longest name, as [`homefs_shared::path::MAX_NAME_BYTES`].
const MAX_NAME: u32 = homefs_shared::path::MAX_NAME_BYTES as u32;

/// The mode bits a client may set (create, mkdir, chmod): permissions and the sticky bit, never
/// set-user-ID or set-group-ID. Every file belongs to fsd's `run_as` user, so a set-user-ID
/// executable uploaded by any user would run as fsd for whoever on the machine can reach it
/// (once that user makes their home searchable), and could then read every home.
pub const CLIENT_MODE_BITS: u32 = 0o1777;

/// What the client sees of a `Stat`.
pub fn attr_of(st: &Stat) -> Attr {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => FileKind::Dir,
        FileType::Symlink => FileKind::Symlink,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        _ => FileKind::File,
    };
    let time = |secs: i64, nanos: u64| Timestamp { secs, nanos: u32::try_from(nanos).unwrap_or(0) };
    #[allow(clippy::unnecessary_cast)] // field widths differ between architectures
    Attr {
        ino: st.st_ino as u64,
        kind,
        perm: st.st_mode & 0o7777,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        size: size_of(st),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: time(st.st_atime as i64, st.st_atime_nsec as u64),
        mtime: time(st.st_mtime as i64, st.st_mtime_nsec as u64),
        ctime: time(st.st_ctime as i64, st.st_ctime_nsec as u64),
    }
}

/// `lstat` of `path`; the home itself for `.`. A path ending in `..` is resolved as a whole in
/// the jail (it is always a directory, so there is no last symlink to not follow).
pub fn lstat(jail: &Jail, path: &WirePath) -> Result<Stat, OpError> {
    if path.split_last().is_some_and(|(_, name)| name == b"..") {
        let fd = jail.open(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        return Ok(rustix::fs::fstat(fd)?);
    }
    let (dir, name) = jail.parent(path)?;
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// Stat: attributes of `path` without following a last symlink.
pub fn stat(jail: &Jail, path: &WirePath) -> Result<Attr, OpError> {
    Ok(attr_of(&lstat(jail, path)?))
}

/// Stat without waiting for the disk: the attributes of `path` if its whole lookup is in the
/// kernel's cache (the path opened `O_PATH | O_NOFOLLOW` with `RESOLVE_CACHED`, then `fstat`: the
/// same lstat semantics as [`stat`], a last symlink described, not followed). `None`: use [`stat`]
/// on the blocking pool (not cached, or an error, which [`stat`] reports).
pub fn stat_cached(jail: &Jail, path: &WirePath) -> Option<Attr> {
    let fd = jail.open_cached(path, OFlags::PATH | OFlags::NOFOLLOW)?;
    // fstat of an open file reads its in-memory inode.
    Some(attr_of(&rustix::fs::fstat(&fd).ok()?))
}

/// SetAttr: size first (it moves mtime), then mode, then times. With a handle the open file is
/// changed; otherwise the path (mode and times without following a last symlink; size follows
/// it inside the jail, as `truncate(2)` does).
pub fn set_attr(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    path: &WirePath,
    handle: Option<&Handle>,
    set: &SetAttr,
) -> Result<Attr, OpError> {
    if let Some(size) = set.size {
        truncate(jail, quota, path, handle, size)?;
    }
    if let Some(mode) = set.mode {
        let mode = mode & CLIENT_MODE_BITS;
        match handle {
            Some(h) => rustix::fs::fchmod(&h.fd, Mode::from_raw_mode(mode))?,
            None => {
                let (dir, name) = jail.parent(path)?;
                // glibc does this without following a symlink and without a race (fchmodat2,
                // or O_PATH plus /proc); a symlink itself answers EOPNOTSUPP, as locally.
                let mode = nix::sys::stat::Mode::from_bits_truncate(mode);
                nix::sys::stat::fchmodat(&dir, name, mode, FchmodatFlags::NoFollowSymlink)?;
            }
        }
    }
    if set.atime.is_some() || set.mtime.is_some() {
        let times = Timestamps { last_access: timespec(set.atime), last_modification: timespec(set.mtime) };
        match handle {
            Some(h) => rustix::fs::futimens(&h.fd, &times)?,
            None => {
                let (dir, name) = jail.parent(path)?;
                rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
            }
        }
    }
    match handle {
        Some(h) => Ok(attr_of(&rustix::fs::fstat(&h.fd)?)),
        None => stat(jail, path),
    }
}

/// Truncates or extends to `size`, quota-checked. A handle not open for writing falls back to
/// the path, as a local `truncate` on the name would.
fn truncate(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    path: &WirePath,
    handle: Option<&Handle>,
    size: u64,
) -> Result<(), OpError> {
    if let Some(h) = handle {
        match truncate_fd(quota, h.fd.as_fd(), size) {
            Err(OpError::Io(e)) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::EINVAL)) => {}
            other => return other,
        }
    }
    let fd = jail.open(path, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty())?;
    truncate_fd(quota, fd.as_fd(), size)
}

/// `ftruncate` within the quota.
pub fn truncate_fd(quota: &Arc<dyn QuotaLedger>, fd: BorrowedFd<'_>, size: u64) -> Result<(), OpError> {
    change_size(quota, fd, |_| size, |_| Ok(rustix::fs::ftruncate(fd, size)?))?;
    Ok(())
}

fn timespec(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(SetTime::Now) => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(SetTime::At(ts)) => Timespec { tv_sec: ts.secs, tv_nsec: ts.nanos.into() },
    }
}

/// StatFs: the quota as the file system's size; free space is what the quota has left, or the
/// disk's free space if that is smaller.
pub fn stat_fs(jail: &Jail, quota: &Arc<dyn QuotaLedger>) -> Result<StatFs, OpError> {
    let vfs = rustix::fs::fstatvfs(jail.dir())?;
    let disk_free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    let (limit, used) = (quota.limit(), quota.used());
    Ok(StatFs {
        total_bytes: limit,
        used_bytes: used,
        free_bytes: limit.saturating_sub(used).min(disk_free),
        block_size: BLOCK_SIZE,
        max_name: MAX_NAME,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail_of(dir: &std::path::Path) -> Jail {
        let fd =
            rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).expect("dir");
        Jail::new(fd)
    }

    fn wp(s: &str) -> WirePath {
        WirePath::new(s.as_bytes().to_vec()).expect("valid")
    }

    /// The stat answered without a hop says what the blocking one says, or nothing.
    #[test]
    fn cached_stat_agrees_with_stat_or_declines() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let p = tmp.path();
        std::fs::create_dir_all(p.join("d/e")).expect("mkdir");
        std::fs::write(p.join("d/f"), b"12345").expect("write");
        std::os::unix::fs::symlink("f", p.join("d/link")).expect("symlink");
        std::os::unix::fs::symlink("/nowhere", p.join("dangling")).expect("symlink");
        std::os::unix::fs::symlink("/d", p.join("abs")).expect("symlink");
        let jail = jail_of(p);
        for path in [".", "d", "d/e", "d/f", "d/link", "dangling", "abs", "abs/f", "d/e/..", "d/../d/f", "../d/f"] {
            let slow = stat(&jail, &wp(path)).unwrap_or_else(|e| panic!("stat {path}: {e}"));
            // Warm the lookup cache the way the slow stat did; the cached one may still decline.
            if let Some(fast) = stat_cached(&jail, &wp(path)) {
                assert_eq!(fast, slow, "{path}");
            }
        }
        // The files were just made: their lookups are cached, so the fast path must answer.
        assert_eq!(stat_cached(&jail, &wp("d/link")).map(|a| a.kind), Some(FileKind::Symlink), "not followed");
        assert_eq!(stat_cached(&jail, &wp("d/f")).map(|a| a.size), Some(5));
        // Errors are left to the slow path.
        assert_eq!(stat_cached(&jail, &wp("absent")), None);
        assert_eq!(stat_cached(&jail, &wp("d/f/x")), None);
    }
}
