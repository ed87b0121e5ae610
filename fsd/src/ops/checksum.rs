//! Checksum: BLAKE3 of a byte range of a file, for verified transfers and resume.

use homefs_shared::{Response, Timestamp, WirePath};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::meta::attr_of;
use super::OpError;
use crate::home::Jail;

/// Bytes read per step: large enough that syscalls do not dominate, small enough to stay in cache.
const CHUNK: usize = 1 << 20;

/// BLAKE3 of `[start, min(end, size))` of the file at `path` (symlinks followed inside the jail),
/// with the length covered and the file's size and mtime when it was opened.
pub fn checksum(jail: &Jail, path: &WirePath, start: u64, end: u64) -> Result<Response, OpError> {
    let fd = jail.open(path, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
    let attr = attr_of(&rustix::fs::fstat(&fd)?);
    let end = end.min(attr.size);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
        match rustix::io::pread(&fd, &mut buf[..want], pos) {
            // The file shrank while it was read: the hash covers what was there.
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mtime: Timestamp = attr.mtime;
    Ok(Response::Checksum {
        hash: *hasher.finalize().as_bytes(),
        len: pos.saturating_sub(start),
        size: attr.size,
        mtime,
    })
}
