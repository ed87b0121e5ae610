//! What netcp needs: verified, resumable transfers, progress, and the FTP-style shell.
//!
//! - [`remote`]: the `[USER@]HOST[:PORT]:PATH` form and remote path arithmetic.
//! - [`transfer`]: one file, put or get: pipelined chunks, BLAKE3 on both ends, temp name then rename.
//! - [`resume`]: the partial file's name and the check of its prefix on both sides.
//! - [`progress`]: indicatif bars on a terminal, else one summary line per file.
//! - [`rate`]: `--bwlimit`, one bandwidth limit for the whole process.
//! - [`tree`]: many files and trees (`-r`, `-j`), symlinks kept as symlinks.
//! - [`batch`]: a tree's small files in batches (`PutFiles`/`GetFiles`), and `Sync` of what a put wrote.
//! - [`shell`]: the FTP-style interactive shell.
//! - [`writeback`]: a download's writeback started as it lands, so that the final sync waits for the tail only.

pub mod batch;
pub mod progress;
pub mod rate;
pub mod remote;
pub mod resume;
pub mod shell;
pub mod transfer;
pub mod tree;
pub mod writeback;

use homefs_shared::{ErrorCode, PathError, WireError};
use std::io;

/// Why one file (or one shell command) failed. Its `Display` is the reason part of the one-line
/// message `netcp: OP PATH: reason`.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The server refused or failed an operation.
    #[error("{0}")]
    Remote(#[from] WireError),
    /// A local file operation failed.
    #[error("{}", io_text(.0))]
    Local(#[from] io::Error),
    /// A path that cannot be sent (NUL byte, too long).
    #[error("{0}")]
    Path(#[from] PathError),
    /// A put that cannot fit in the quota; nothing was created.
    #[error("{} (needs {}, {} free)", ErrorCode::QuotaExceeded, human_bytes(*.needs), human_bytes(*.free))]
    Quota { needs: u64, free: u64 },
    /// The BLAKE3 of the two ends differed, also after one retry from scratch.
    #[error("verification failed: BLAKE3 differs between client and server (after a retry)")]
    Verify,
    /// The file changed on the source side while it was copied.
    #[error("the source changed during the copy")]
    SourceChanged,
    /// Something the command cannot do (a directory without `-r`, a special file...).
    #[error("{0}")]
    Unsupported(String),
}

impl CopyError {
    /// Whether this error means the copy arrived but did not verify (exit status 4).
    pub fn is_verify(&self) -> bool {
        matches!(self, CopyError::Verify)
    }

    /// Whether this error means the connection is gone (exit status 3).
    pub fn is_connection(&self) -> bool {
        matches!(self, CopyError::Remote(e) if matches!(e.code, ErrorCode::NotConnected | ErrorCode::TimedOut))
    }
}

/// An `io::Error` as users know it: the system's text without "(os error N)".
pub fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(_) => ErrorCode::from(e).to_string(),
        None => e.to_string(),
    }
}

/// Bytes in binary units with one decimal: `4.2 GiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4_509_715_660), "4.2 GiB");
    }

    #[test]
    fn quota_message_names_both_sizes() {
        let e = CopyError::Quota { needs: 4_509_715_660, free: 1_181_116_006 };
        assert_eq!(e.to_string(), "Disk quota exceeded (needs 4.2 GiB, 1.1 GiB free)");
    }
}
