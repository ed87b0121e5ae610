//! Open files: Open, Read, Write, Fsync. Writes and truncation go through the quota's size
//! section ([`super::sizing`]).

use bytes::{Bytes, BytesMut};
use homefs_shared::{Attr, ErrorCode, Fh, OpenFlags, Response, WireError, WirePath, MAX_DATA_BYTES};
use rustix::fs::{Mode, OFlags};
use rustix::io::{Errno, IoSliceMut, ReadWriteFlags};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::handles::Handle;
use super::meta::{attr_of, truncate_fd, CLIENT_MODE_BITS};
use super::sizing::{change_size, size_of};
use super::OpError;
use crate::home::{Jail, QuotaLedger};

/// Open: opens (or creates) `path`, following symlinks inside the jail, and truncates it under
/// the quota when asked. Returns the handle to insert and the attributes after truncation.
pub fn open(
    jail: &Jail,
    quota: &Arc<dyn QuotaLedger>,
    path: &WirePath,
    flags: OpenFlags,
    mode: u32,
) -> Result<(Handle, Attr), OpError> {
    let writes = flags.write || flags.append;
    if flags.truncate && !writes {
        return Err(ErrorCode::Invalid.into());
    }
    let mut how = match (flags.read, writes) {
        (true, true) => OFlags::RDWR,
        (false, true) => OFlags::WRONLY,
        (_, false) => OFlags::RDONLY,
    };
    // NONBLOCK: opening a FIFO must not wait for a peer forever (it has no effect on regular
    // files); NOCTTY: a terminal device never becomes fsd's controlling terminal.
    how |= OFlags::NONBLOCK | OFlags::NOCTTY;
    if flags.append {
        how |= OFlags::APPEND;
    }
    if flags.create {
        how |= OFlags::CREATE;
        if flags.exclusive {
            how |= OFlags::EXCL;
        }
    }
    // Not O_TRUNC: truncation frees quota, so it is done below inside the size section.
    // openat2 refuses a mode without O_CREAT (EINVAL), unlike open(2), which ignores it.
    let mode = if flags.create { Mode::from_raw_mode(mode & CLIENT_MODE_BITS) } else { Mode::empty() };
    let fd = jail.open(path, how, mode)?;
    if flags.truncate {
        truncate_fd(quota, fd.as_fd(), 0)?;
    }
    let st = rustix::fs::fstat(&fd)?;
    let file = (st.st_dev, st.st_ino);
    let handle = Handle {
        fd,
        append: flags.append,
        file,
        path: path.clone(),
        notice: Default::default(),
        no_nowait: Default::default(),
        behind: Default::default(),
    };
    Ok((handle, attr_of(&st)))
}

/// Read: up to `min(len, MAX_DATA_BYTES)` bytes at `offset`, fewer only at end of file; returns
/// the bytes and the file's size after the read.
pub fn read(handle: &Handle, offset: u64, len: u32) -> Result<(Bytes, u64), OpError> {
    let want = len.min(MAX_DATA_BYTES) as usize;
    // Read into the vector's spare capacity (`spare_capacity` extends its length by what was
    // read): no memset of a buffer the read overwrites anyway (1% of fsd's CPU in a 1 GiB get).
    let mut buf = Vec::with_capacity(want);
    while buf.len() < want {
        let at = offset.saturating_add(buf.len() as u64);
        match rustix::io::pread(&handle.fd, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let size = size_of(&rustix::fs::fstat(&handle.fd)?);
    Ok((Bytes::from(buf), size))
}

/// Read for the session layer, on the calling thread (it waits for the disk): what
/// [`super::AuthedSession::handle`] answers to a `Read`, without the request's async task around
/// it (`Read` changes nothing, so there is no change notice to publish). The session layer runs
/// it on a blocking thread that also writes the answer (`session::ReadNow`), so a read that misses
/// the page cache costs one hop to that thread, instead of reader -> task -> blocking pool -> task
/// -> writer; or, for a small read alone in flight, on the session's reader itself, no hop at all
/// (`session::read_in_place`).
///
/// # Errors
/// The code the client sees: `BadHandle` for a handle this session does not hold, else the errno.
pub fn read_now(session: &super::AuthedSession, fh: Fh, offset: u64, len: u32) -> Result<(Response, Bytes), WireError> {
    let read = session.handles.get(fh).map_err(OpError::from).and_then(|h| read(&h, offset, len));
    match read {
        Ok((bytes, size)) => Ok((Response::Data { size }, bytes)),
        Err(e) => {
            session.log_failure(&e);
            Err(WireError::from(e))
        }
    }
}

/// Reads of at most this many bytes may be answered on the session's own task when the data is
/// in the page cache ([`read_cached`]): small reads are where a hop to the blocking pool costs
/// most relative to the work; a large read's copy is better done off the runtime's threads.
pub const CACHED_READ_MAX: u32 = 64 << 10;

/// Read, without blocking: the bytes at `offset` if every one of them is in the page cache
/// (`preadv2` with `RWF_NOWAIT`), with the file's size after the read; `None` when the read would
/// wait for the disk (or the file system does not say), and the caller should use [`read`] on the
/// blocking pool instead. Errors are not reported here: [`read`] reports them.
pub fn read_cached(handle: &Handle, offset: u64, len: u32) -> Option<(Bytes, u64)> {
    if len > CACHED_READ_MAX || handle.no_nowait.load(Ordering::Relaxed) {
        return None;
    }
    let want = len as usize;
    let mut buf = BytesMut::zeroed(want);
    let done = match rustix::io::preadv2(&handle.fd, &mut [IoSliceMut::new(&mut buf)], offset, ReadWriteFlags::NOWAIT) {
        Ok(n) => n,
        Err(Errno::AGAIN) => return None,
        Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => {
            // This file (its file system, or the kernel) cannot tell: never ask again for it.
            handle.no_nowait.store(true, Ordering::Relaxed);
            return None;
        }
        Err(_) => return None,
    };
    // fstat of an open file reads its in-memory inode: it does not wait for the disk.
    let size = size_of(&rustix::fs::fstat(&handle.fd).ok()?);
    // A short read is the end of the file, or only part of the range was cached.
    if done < want && offset.saturating_add(done as u64) < size {
        return None;
    }
    buf.truncate(done);
    Some((buf.freeze(), size))
}

/// Write: all of `data` at `offset` (at the end for an `append` handle), quota-checked before
/// any byte is written. Returns the file's size afterwards. A file written front to back gets
/// its writeback started as it grows ([`write_behind`]).
pub fn write(quota: &Arc<dyn QuotaLedger>, handle: &Handle, offset: u64, data: &[u8]) -> Result<u64, OpError> {
    let len = data.len() as u64;
    let fd = handle.fd.as_fd();
    let target = |old: u64| if handle.append { old.saturating_add(len) } else { old.max(offset.saturating_add(len)) };
    let ((), st) = change_size(quota, fd, target, |old| write_all_at(fd, data, offset, old))?;
    write_behind(handle, offset, len, &st);
    Ok(size_of(&st))
}

/// As [`write`], returning the file's attributes after the write (for `WriteAttr`).
pub fn write_attr(quota: &Arc<dyn QuotaLedger>, handle: &Handle, offset: u64, data: &[u8]) -> Result<Attr, OpError> {
    let len = data.len() as u64;
    let fd = handle.fd.as_fd();
    let target = |old: u64| if handle.append { old.saturating_add(len) } else { old.max(offset.saturating_add(len)) };
    let ((), st) = change_size(quota, fd, target, |old| write_all_at(fd, data, offset, old))?;
    write_behind(handle, offset, len, &st);
    Ok(attr_of(&st))
}

/// After a write of `len` bytes at `offset` (`st`: the file afterwards, whose end an append landed
/// at): starts the writeback of the part of a file written front to back that is due (see
/// [`super::handles::WriteBehind`]), without waiting for it, outside the size lock.
///
/// Why: a large upload (netcp put, a file copied onto the mount) otherwise leaves all of it dirty
/// in the page cache (this VM's dirty threshold is 10% of 24 GiB), and the sync that makes it
/// durable then writes it all while the client waits: 0.30-0.49 s of a 1 GiB netcp put. Started
/// during the stream, the disk writes while the rest arrives. `posix_fadvise(DONTNEED)` is the one
/// call that starts writeback without `unsafe` (`sync_file_range` is in neither rustix nor nix):
/// it writes the range's dirty pages (WB_SYNC_NONE) and drops only the pages already clean; the
/// range was just written, so its pages are dirty or under writeback and stay cached (the
/// segment checksums of a put read them next).
fn write_behind(handle: &Handle, offset: u64, len: u64, st: &rustix::fs::Stat) {
    let start = if handle.append { size_of(st).saturating_sub(len) } else { offset };
    if let Some((from, n)) = handle.behind.due(start, start.saturating_add(len)) {
        if let Some(n) = std::num::NonZeroU64::new(n) {
            // Best effort: a file system that ignores the advice is written by the sync.
            let _ = rustix::fs::fadvise(&handle.fd, from, Some(n), rustix::fs::Advice::DontNeed);
        }
    }
}

/// Writes every byte, looping on short writes. If it fails part-way after growing the file, the
/// growth is cut off again, so a failed write (ENOSPC) leaves the file's size as it was.
fn write_all_at(fd: BorrowedFd<'_>, data: &[u8], offset: u64, old_size: u64) -> Result<(), OpError> {
    let mut done = 0;
    while done < data.len() {
        // With O_APPEND, Linux's pwrite ignores the offset and appends, which is what we want.
        match rustix::io::pwrite(fd, &data[done..], offset.saturating_add(done as u64)) {
            Ok(0) => return Err(ErrorCode::NoSpace.into()),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => {
                if done > 0 {
                    if let Ok(st) = rustix::fs::fstat(fd) {
                        if size_of(&st) > old_size {
                            // Best effort: the size section settles on whatever size results.
                            let _ = rustix::fs::ftruncate(fd, old_size);
                        }
                    }
                }
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Fsync: `fsync` or `fdatasync` of the open file.
pub fn fsync(handle: &Handle, datasync: bool) -> Result<(), OpError> {
    if datasync {
        rustix::fs::fdatasync(&handle.fd)?;
    } else {
        rustix::fs::fsync(&handle.fd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::LocalLedger;

    #[test]
    fn cached_reads_agree_with_reads_or_decline() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(tmp.path().join("f"), &data).expect("write");
        let dir = rustix::fs::open(tmp.path(), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("dir");
        let jail = Jail::new(dir);
        let quota: Arc<dyn QuotaLedger> = Arc::new(LocalLedger::new(u64::MAX, 0));
        let path = WirePath::new("f").expect("valid");
        let flags = OpenFlags { read: true, ..OpenFlags::default() };
        let (h, _) = open(&jail, &quota, &path, flags, 0).expect("open");
        // Just written: in the page cache, so the fast path answers (unless the file system
        // cannot tell, which the handle then remembers).
        let mut answered = 0;
        for (offset, len) in [(0, 4096), (4093, 4096), (99_000, 4096), (100_000, 4096), (200_000, 10), (0, 0)] {
            let (slow, slow_size) = read(&h, offset, len).expect("read");
            if let Some((fast, fast_size)) = read_cached(&h, offset, len) {
                answered += 1;
                assert_eq!((fast, fast_size), (slow, slow_size), "at {offset} len {len}");
            }
        }
        assert!(answered == 6 || h.no_nowait.load(Ordering::Relaxed), "a cached file is read without a hop");
        assert_eq!(read_cached(&h, 0, CACHED_READ_MAX + 1), None, "large reads go to the blocking pool");
    }

    /// Bytes of dirty pages this thread dropped by truncating (`/proc/thread-self/io`): what
    /// was still dirty in the page cache, not written back, when the file was cut.
    fn thread_cancelled_write_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        let field = io.lines().find_map(|l| l.strip_prefix("cancelled_write_bytes: "));
        field.and_then(|v| v.parse().ok()).expect("cancelled_write_bytes")
    }

    #[test]
    fn a_file_written_front_to_back_is_written_back_as_it_grows() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = rustix::fs::open(tmp.path(), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .expect("dir");
        if rustix::fs::fstatfs(&dir).expect("statfs").f_type == 0x0102_1994 {
            eprintln!("skipped: the temp dir is on tmpfs, which has no writeback");
            return;
        }
        let jail = Jail::new(dir);
        let quota: Arc<dyn QuotaLedger> = Arc::new(LocalLedger::new(u64::MAX, 0));
        let flags = OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() };
        let (h, _) = open(&jail, &quota, &WirePath::new("big").expect("valid"), flags, 0o600).expect("open");
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        // 48 MiB: the first 32 MiB are due once the front is 8 MiB past them; far below the
        // kernel's own dirty thresholds (on any machine with more than ~500 MiB of memory), so
        // without the advice all of it would still be dirty.
        for i in 0..48u64 {
            write(&quota, &h, i << 20, &chunk).expect("write");
        }
        let (back, _) = read(&h, 47 << 20, 1 << 20).expect("read back");
        assert!(back[..] == chunk[..], "the data is still there");
        // Cutting the file drops what is still dirty (and waits for what is under writeback).
        let before = thread_cancelled_write_bytes();
        rustix::fs::ftruncate(&h.fd, 0).expect("truncate");
        let dirty = thread_cancelled_write_bytes() - before;
        assert!(dirty <= 24 << 20, "writeback of 32 MiB was started during the writes, yet {dirty} bytes were dirty");
    }
}
