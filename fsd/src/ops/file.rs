//! Open files: Open, Read, Write, Fsync. Writes and truncation go through the quota's size
//! section ([`super::sizing`]).

use bytes::{Bytes, BytesMut};
use homefs_shared::{Attr, ErrorCode, OpenFlags, WirePath, MAX_DATA_BYTES};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::os::fd::{AsFd, BorrowedFd};
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
    let handle = Handle { fd, append: flags.append, file: (st.st_dev, st.st_ino) };
    Ok((handle, attr_of(&st)))
}

/// Read: up to `min(len, MAX_DATA_BYTES)` bytes at `offset`, fewer only at end of file; returns
/// the bytes and the file's size after the read.
pub fn read(handle: &Handle, offset: u64, len: u32) -> Result<(Bytes, u64), OpError> {
    let want = len.min(MAX_DATA_BYTES) as usize;
    let mut buf = BytesMut::zeroed(want);
    let mut done = 0;
    while done < want {
        match rustix::io::pread(&handle.fd, &mut buf[done..], offset.saturating_add(done as u64)) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(done);
    let size = size_of(&rustix::fs::fstat(&handle.fd)?);
    Ok((buf.freeze(), size))
}

/// Write: all of `data` at `offset` (at the end for an `append` handle), quota-checked before
/// any byte is written. Returns the file's size afterwards.
pub fn write(quota: &Arc<dyn QuotaLedger>, handle: &Handle, offset: u64, data: &[u8]) -> Result<u64, OpError> {
    let len = data.len() as u64;
    let fd = handle.fd.as_fd();
    let target = |old: u64| if handle.append { old.saturating_add(len) } else { old.max(offset.saturating_add(len)) };
    let ((), st) = change_size(quota, fd, target, |old| write_all_at(fd, data, offset, old))?;
    Ok(size_of(&st))
}

/// As [`write`], returning the file's attributes after the write (for `WriteAttr`).
pub fn write_attr(quota: &Arc<dyn QuotaLedger>, handle: &Handle, offset: u64, data: &[u8]) -> Result<Attr, OpError> {
    let len = data.len() as u64;
    let fd = handle.fd.as_fd();
    let target = |old: u64| if handle.append { old.saturating_add(len) } else { old.max(offset.saturating_add(len)) };
    let ((), st) = change_size(quota, fd, target, |old| write_all_at(fd, data, offset, old))?;
    Ok(attr_of(&st))
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
