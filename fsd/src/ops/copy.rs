//! CopyRange: server-side `copy_file_range` between two open files, quota-checked like a write,
//! so `cp` inside the mount moves no data over the wire.

use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::io::Errno;

use super::handles::Handle;
use super::sizing::{change_size, size_of};
use super::OpError;
use crate::home::{QuotaError, QuotaLedger};

/// Bytes copied per hold of the user's size lock: a multi-gigabyte copy does not stall the
/// user's other writes for its whole length, and one chunk takes tens of milliseconds.
const CHUNK: u64 = 64 << 20;

/// Copies up to `len` bytes (fewer at the source's end of file); returns how many were copied.
/// The whole copy's growth of `dst` is checked against the quota before anything is copied.
pub fn copy_range(
    quota: &Arc<dyn QuotaLedger>,
    src: &Handle,
    src_offset: u64,
    dst: &Handle,
    dst_offset: u64,
    len: u64,
) -> Result<u64, OpError> {
    let src_size = size_of(&rustix::fs::fstat(&src.fd)?);
    let len = len.min(src_size.saturating_sub(src_offset));
    if len == 0 {
        return Ok(0);
    }
    {
        let _sizing = quota.size_lock();
        let dst_size = size_of(&rustix::fs::fstat(&dst.fd)?);
        let needed = dst_offset.saturating_add(len).saturating_sub(dst_size);
        let free = quota.limit().saturating_sub(quota.used());
        if needed > free {
            return Err(QuotaError::Exceeded { needed, free }.into());
        }
    }
    let mut copied = 0u64;
    while copied < len {
        let chunk = CHUNK.min(len - copied);
        let (mut off_in, mut off_out) = (src_offset + copied, dst_offset + copied);
        let end = off_out.saturating_add(chunk);
        let target = |old: u64| old.max(end);
        let result = change_size(quota, dst.fd.as_fd(), target, |_| {
            let mut done = 0u64;
            while done < chunk {
                let step = usize::try_from(chunk - done).unwrap_or(usize::MAX);
                match rustix::fs::copy_file_range(&src.fd, Some(&mut off_in), &dst.fd, Some(&mut off_out), step) {
                    Ok(0) => break,
                    Ok(n) => done += n as u64,
                    Err(Errno::INTR) => continue,
                    // Bytes already copied are reported; the error comes with the next request.
                    Err(e) if done == 0 => return Err(e.into()),
                    Err(_) => break,
                }
            }
            Ok(done)
        });
        let n = match result {
            Ok((n, _)) => n,
            Err(e) if copied == 0 => return Err(e),
            // What was copied is reported; the error comes again with the next request.
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        copied += n;
        if n < chunk {
            break;
        }
    }
    Ok(copied)
}
