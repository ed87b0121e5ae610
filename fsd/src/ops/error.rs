//! [`OpError`]: why a file operation failed, turned into the [`WireError`] the client sees. The
//! code alone decides what the client does; the message is only added where it helps (quota).

use homefs_shared::{ErrorCode, PathError, WireError};
use std::io;

use crate::home::QuotaError;

/// A failed operation.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A syscall failed; its errno is the code.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The quota would be exceeded; nothing was written.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// A code decided by fsd itself (a bad handle, too many open files, a lock conflict).
    #[error("{0}")]
    Code(ErrorCode),
    /// An operation running inline found the user's size lock held (by a write on the blocking
    /// pool, which may hold it across a disk wait) and changed nothing: it is run again on the pool
    /// ([`super::inline::size_lock`]). Never meant to reach a client; if it did, as `EIO`.
    #[error("the user's size lock is held; to be run on the blocking pool")]
    Busy,
}

impl From<rustix::io::Errno> for OpError {
    fn from(e: rustix::io::Errno) -> OpError {
        OpError::Io(e.into())
    }
}

impl From<nix::errno::Errno> for OpError {
    fn from(e: nix::errno::Errno) -> OpError {
        OpError::Io(io::Error::from_raw_os_error(e as i32))
    }
}

impl From<ErrorCode> for OpError {
    fn from(code: ErrorCode) -> OpError {
        OpError::Code(code)
    }
}

impl From<PathError> for OpError {
    fn from(e: PathError) -> OpError {
        OpError::Code(e.code())
    }
}

impl OpError {
    /// The code the client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::Io(e) => ErrorCode::from(e),
            OpError::Quota(_) => ErrorCode::QuotaExceeded,
            OpError::Code(c) => *c,
            OpError::Busy => ErrorCode::Io,
        }
    }
}

impl From<OpError> for WireError {
    fn from(e: OpError) -> WireError {
        match e {
            OpError::Quota(q) => WireError::new(ErrorCode::QuotaExceeded, q.to_string()),
            other => WireError::from(other.code()),
        }
    }
}
