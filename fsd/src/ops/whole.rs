//! Whole-file requests: PutFile (a small file stored in one request under a temporary name and
//! renamed into place), GetFile (a small file read in one request), their batches PutFiles and
//! GetFiles (many small files in one request and one blocking hop), SyncFs (one `syncfs` for
//! everything written before it) and Sync (only the named paths made durable).

use bytes::{Bytes, BytesMut};
use homefs_shared::{
    sync_cost, Attr, ErrorCode, FileItem, FileKind, PutItem, StoredItem, Timestamp, WireError, WirePath,
    MAX_BATCH_FILES, MAX_DATA_BYTES, MAX_SYNC_PATHS,
};
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
    let sizing = super::inline::size_lock(quota.as_ref())?;
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
    let mut buf = BytesMut::new();
    let (attr, hash, _) = read_file_into(jail, path, max_len.min(MAX_DATA_BYTES), false, &mut buf)?;
    Ok((attr, hash, buf.freeze()))
}

/// Appends to `buf` the first `min(size, max_len)` bytes of the regular file at `path` (none for
/// other kinds; with `whole_only`, none when the whole file does not fit in `max_len`); returns
/// its attributes, the BLAKE3 of the bytes appended, and how many there are.
fn read_file_into(
    jail: &Jail,
    path: &WirePath,
    max_len: u32,
    whole_only: bool,
    buf: &mut BytesMut,
) -> Result<(Attr, [u8; 32], u32), OpError> {
    let fd = jail.open(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY, Mode::empty())?;
    let attr = attr_of(&rustix::fs::fstat(&fd)?);
    if attr.kind != FileKind::File || (whole_only && attr.size > u64::from(max_len)) {
        return Ok((attr, *blake3::hash(&[]).as_bytes(), 0));
    }
    let want = usize::try_from(attr.size.min(u64::from(max_len))).unwrap_or(0);
    let start = buf.len();
    buf.resize(start + want, 0);
    let mut done = 0;
    while done < want {
        match rustix::io::pread(&fd, &mut buf[start + done..start + want], done as u64) {
            // The file shrank after the fstat: what was there is sent; the client sees fewer bytes.
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => {
                buf.truncate(start);
                return Err(e.into());
            }
        }
    }
    buf.truncate(start + done);
    let hash = *blake3::hash(&buf[start..]).as_bytes();
    // `done` <= `max_len`, a u32.
    Ok((attr, hash, u32::try_from(done).unwrap_or(u32::MAX)))
}

/// The outcome of each file of a batch, in order; the batch itself fails only when it is malformed.
pub type BatchResults<T> = Vec<Result<T, OpError>>;

/// A batch's outcomes as the wire carries them, each failure passed to `log` first (as a failed
/// request is logged).
pub fn to_wire<T>(results: BatchResults<T>, log: impl Fn(&OpError)) -> Vec<Result<T, WireError>> {
    results
        .into_iter()
        .map(|r| {
            r.map_err(|e| {
                log(&e);
                WireError::from(e)
            })
        })
        .collect()
}

/// PutFiles: each item stored as [`put_file`] stores one (not exclusive), its content the next
/// `len` bytes of `data`. One item's failure (quota, a directory at its name...) is its own.
///
/// # Errors
/// `TooBig` for more than [`MAX_BATCH_FILES`] items or more than `MAX_DATA_BYTES` of data;
/// `Protocol` when the lengths do not add up to the data's length.
pub fn put_files(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    files: &[PutItem],
    data: &[u8],
) -> Result<BatchResults<StoredItem>, OpError> {
    if files.len() > MAX_BATCH_FILES || data.len() > MAX_DATA_BYTES as usize {
        return Err(ErrorCode::TooBig.into());
    }
    let total: u64 = files.iter().map(|f| u64::from(f.len)).sum();
    if total != data.len() as u64 {
        return Err(ErrorCode::Protocol.into());
    }
    let mut at = 0usize;
    Ok(files
        .iter()
        .map(|f| {
            // In range: the lengths add up to data.len() (checked above).
            let bytes = &data[at..at + f.len as usize];
            at += f.len as usize;
            put_file(jail, quota, &f.path, f.mode, f.mtime, false, bytes).map(|(hash, attr)| StoredItem { hash, attr })
        })
        .collect())
}

/// GetFiles: each path read as [`get_file`] reads one, the whole contents back to back in the
/// returned bytes, at most `min(max_bytes, MAX_DATA_BYTES)` in all: a regular file that does not
/// fit in what is left is answered with its attributes and no bytes (`len` 0).
///
/// # Errors
/// `TooBig` for more than [`MAX_BATCH_FILES`] paths.
pub fn get_files(jail: &Jail, paths: &[WirePath], max_bytes: u32) -> Result<(BatchResults<FileItem>, Bytes), OpError> {
    if paths.len() > MAX_BATCH_FILES {
        return Err(ErrorCode::TooBig.into());
    }
    let budget = max_bytes.min(MAX_DATA_BYTES);
    let mut buf = BytesMut::new();
    let results = paths
        .iter()
        .map(|p| {
            let left = budget.saturating_sub(u32::try_from(buf.len()).unwrap_or(u32::MAX));
            read_file_into(jail, p, left, true, &mut buf).map(|(attr, hash, len)| FileItem { attr, hash, len })
        })
        .collect();
    Ok((results, buf.freeze()))
}

/// Files up to this size get their writeback started before the fsyncs of a `Sync` (see
/// [`sync_paths`]); larger ones are only fsynced.
const ADVISE_MAX_BYTES: u64 = 16 << 20;

/// Sync: makes each path's content, attributes and entry durable: every file and directory named
/// is fsynced (writeback of all of them is started first, so that their data goes to the disk
/// together and each fsync then mostly waits), then each parent directory once. A symlink is not
/// followed: its parent directory holds it. When one `syncfs` is expected to be cheaper (many
/// paths and little else dirty, see [`homefs_shared::sync_cost`]), that is done instead. A path that no longer exists is
/// skipped (it was replaced or removed after it was stored: nothing of it is left to keep).
///
/// # Errors
/// `TooBig` for more than [`MAX_SYNC_PATHS`] paths; the first fsync that failed (`Io`).
pub fn sync_paths(jail: &Jail, paths: &[WirePath]) -> Result<(), OpError> {
    if paths.len() > MAX_SYNC_PATHS {
        return Err(ErrorCode::TooBig.into());
    }
    let mut parents: Vec<WirePath> =
        paths.iter().map(|p| p.split_last().map_or_else(WirePath::root, |(d, _)| d)).collect();
    parents.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    parents.dedup();
    let dirty = sync_cost::dirty_bytes();
    let whole_fs = sync_cost::syncfs_is_cheaper(paths.len() + parents.len(), dirty);
    tracing::debug!(paths = paths.len(), parents = parents.len(), ?dirty, whole_fs, "sync");
    if whole_fs {
        return sync_fs(jail);
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let mut fds = Vec::with_capacity(paths.len());
    for p in paths {
        match jail.open(p, flags, Mode::empty()) {
            Ok(fd) => {
                // Starts the writeback of the file's dirty pages without waiting (the only such
                // call without `unsafe`; pages still under writeback stay cached). Not for a
                // large file: it also drops the pages already clean, and a 1 GiB file put just
                // now would then be read from the disk by the next get (1.61 s cold vs 1.22 s
                // warm); its fsync below writes it anyway.
                if rustix::fs::fstat(&fd).is_ok_and(|st| st.st_size as u64 <= ADVISE_MAX_BYTES) {
                    let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::DontNeed);
                }
                fds.push(fd);
            }
            // A symlink (its entry is synced with its parent), or gone since.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOENT)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for fd in &fds {
        rustix::fs::fsync(fd)?;
    }
    drop(fds);
    for d in &parents {
        match jail.open(d, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOCTTY, Mode::empty()) {
            Ok(fd) => rustix::fs::fsync(&fd)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// SyncFs: `syncfs(2)` of the file system holding the home.
pub fn sync_fs(jail: &Jail) -> Result<(), OpError> {
    rustix::fs::syncfs(jail.dir())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::LocalLedger;

    /// A jail over a fresh temp dir, and a ledger of `limit` bytes.
    fn home(limit: u64) -> (tempfile::TempDir, Jail, Arc<dyn QuotaLedger>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fd = rustix::fs::open(tmp.path(), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("open home");
        let ledger: Arc<dyn QuotaLedger> = Arc::new(LocalLedger::new(limit, 0));
        (tmp, Jail::new(fd), ledger)
    }

    fn p(s: &str) -> WirePath {
        WirePath::new(s.as_bytes().to_vec()).expect("valid path")
    }

    fn item(path: &str, len: usize) -> PutItem {
        PutItem { path: p(path), mode: 0o640, mtime: None, len: u32::try_from(len).expect("small") }
    }

    #[test]
    fn put_files_refuses_one_file_alone() {
        let (tmp, jail, quota) = home(10_000);
        std::fs::create_dir_all(tmp.path().join("dir/inside")).expect("mkdir");
        let (a, b, c) = (vec![1u8; 3000], vec![2u8; 10], vec![3u8; 4000]);
        let data = [a.clone(), b.clone(), c.clone()].concat();
        let files = [item("a", a.len()), item("dir", b.len()), item("c", c.len())];
        let results = put_files(&jail, &quota, &files, &data).expect("the batch is well formed");
        assert_eq!(results.len(), 3);
        assert!(matches!(&results[0], Ok(s) if s.hash == *blake3::hash(&a).as_bytes() && s.attr.size == 3000));
        assert!(results[1].is_err(), "a non-empty directory at the name: {:?}", results[1]);
        assert!(matches!(&results[2], Ok(s) if s.hash == *blake3::hash(&c).as_bytes()));
        assert_eq!(std::fs::read(tmp.path().join("c")).expect("c"), c);
        assert!(tmp.path().join("dir/inside").is_dir());
        // Quota per file: 7,000 used of 10,000; the first 2,000 fit, the next 2,000 do not.
        let files = [item("d", 2000), item("e", 2000)];
        let results = put_files(&jail, &quota, &files, &[0u8; 4000]).expect("well formed");
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(e) if e.code() == ErrorCode::QuotaExceeded), "{:?}", results[1]);
        assert!(!tmp.path().join("e").exists());
        // Lengths that do not add up fail the whole batch.
        let bad = put_files(&jail, &quota, &[item("f", 5)], &[0u8; 4]).map(|_| ());
        assert!(matches!(bad, Err(e) if e.code() == ErrorCode::Protocol));
        let names: Vec<_> = std::fs::read_dir(tmp.path()).expect("list").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
    }

    #[test]
    fn get_files_sends_whole_files_within_the_budget() {
        let (tmp, jail, _) = home(1 << 30);
        std::fs::write(tmp.path().join("a"), [1u8; 3000]).expect("write");
        std::fs::write(tmp.path().join("b"), [2u8; 3000]).expect("write");
        std::fs::write(tmp.path().join("c"), [3u8; 100]).expect("write");
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        let paths = [p("a"), p("b"), p("c"), p("d"), p("missing")];
        let (results, data) = get_files(&jail, &paths, 5000).expect("well formed");
        let lens: Vec<Option<u32>> = results.iter().map(|r| r.as_ref().ok().map(|i| i.len)).collect();
        // b does not fit in what is left after a (2,000 of 5,000): none of it; c still does.
        assert_eq!(lens, vec![Some(3000), Some(0), Some(100), Some(0), None]);
        assert_eq!(results[1].as_ref().map(|i| i.attr.size).ok(), Some(3000));
        assert_eq!(results[3].as_ref().map(|i| i.attr.kind).ok(), Some(FileKind::Dir));
        assert!(matches!(&results[4], Err(e) if e.code() == ErrorCode::NotFound));
        assert_eq!(&data[..], &[[1u8; 3000].as_slice(), [3u8; 100].as_slice()].concat()[..]);
        assert_eq!(results[2].as_ref().map(|i| i.hash).ok(), Some(*blake3::hash(&[3u8; 100]).as_bytes()));
    }

    #[test]
    fn sync_takes_files_dirs_symlinks_and_gone_paths() {
        let (tmp, jail, _) = home(1 << 30);
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        std::fs::write(tmp.path().join("d/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/nowhere", tmp.path().join("d/l")).expect("symlink");
        sync_paths(&jail, &[p("d"), p("d/f"), p("d/l"), p("d/gone"), p("top")]).expect("synced");
        let too_many: Vec<WirePath> = (0..=MAX_SYNC_PATHS).map(|_| p("d/f")).collect();
        assert!(matches!(sync_paths(&jail, &too_many), Err(e) if e.code() == ErrorCode::TooBig));
    }
}
