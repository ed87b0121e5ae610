//! [`ErrorCode`]: the only errno table in homefs.
//!
//! The server turns an `io::Error` into a code with `ErrorCode::from(&err)`; the mount answers the
//! kernel with `code.errno()`; netcp prints `code` (its `Display` is the system's text for the
//! errno, so users read the messages they know: "Disk quota exceeded", "Directory not empty").
//! On the wire a code is a `u16` whose numbers never change; a number this build does not know
//! decodes as [`ErrorCode::Io`], so a newer peer cannot break an older one.

use serde::{Deserialize, Serialize};
use std::{fmt, io};

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $num:literal => $errno:ident,)*) => {
        /// An error as the peer sees it: each code is one POSIX errno.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "u16", into = "u16")]
        pub enum ErrorCode { $($(#[$doc])* $name,)* }

        impl ErrorCode {
            /// Every code, for tests and documentation.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The stable number on the wire.
            pub fn wire(self) -> u16 {
                match self { $(ErrorCode::$name => $num,)* }
            }

            /// The POSIX errno this code stands for.
            pub fn errno(self) -> i32 {
                match self { $(ErrorCode::$name => libc::$errno,)* }
            }

            /// The code for an errno; errnos without a code of their own become [`ErrorCode::Io`].
            pub fn from_errno(errno: i32) -> ErrorCode {
                match errno {
                    $(libc::$errno => ErrorCode::$name,)*
                    // Aliases on Linux: EWOULDBLOCK == EAGAIN, EDEADLOCK == EDEADLK,
                    // ENOTSUP == EOPNOTSUPP. They match the arms above.
                    _ => ErrorCode::Io,
                }
            }
        }

        impl From<u16> for ErrorCode {
            fn from(n: u16) -> ErrorCode {
                match n { $($num => ErrorCode::$name,)* _ => ErrorCode::Io }
            }
        }
    };
}

error_codes! {
    /// `EIO`: an error with no code of its own; also what an unknown wire number decodes as.
    Io = 1 => EIO,
    /// `EPERM`
    NotPermitted = 2 => EPERM,
    /// `ENOENT`
    NotFound = 3 => ENOENT,
    /// `EEXIST`
    Exists = 4 => EEXIST,
    /// `ENOTEMPTY`
    NotEmpty = 5 => ENOTEMPTY,
    /// `EACCES`: also a request made before login.
    Access = 6 => EACCES,
    /// `EDQUOT`: the user's quota would be exceeded; nothing was written.
    QuotaExceeded = 7 => EDQUOT,
    /// `ENOSPC`: the server's disk is full.
    NoSpace = 8 => ENOSPC,
    /// `ENAMETOOLONG`
    NameTooLong = 9 => ENAMETOOLONG,
    /// `EXDEV`
    CrossDevice = 10 => EXDEV,
    /// `ENOTDIR`
    NotDir = 11 => ENOTDIR,
    /// `EISDIR`
    IsDir = 12 => EISDIR,
    /// `EINVAL`: also a NUL byte in a name.
    Invalid = 13 => EINVAL,
    /// `EBADF`: a file handle this session does not hold.
    BadHandle = 14 => EBADF,
    /// `ELOOP`: too many symlinks, or a symlink where none may be followed.
    Loop = 15 => ELOOP,
    /// `EROFS`
    ReadOnly = 16 => EROFS,
    /// `EFBIG`
    TooBig = 17 => EFBIG,
    /// `EMLINK`
    TooManyLinks = 18 => EMLINK,
    /// `EBUSY`
    Busy = 19 => EBUSY,
    /// `EAGAIN`: a lock held by another owner (non-blocking request), or a lock wait to re-send.
    WouldBlock = 20 => EAGAIN,
    /// `EDEADLK`
    Deadlock = 21 => EDEADLK,
    /// `ENOLCK`
    NoLocks = 22 => ENOLCK,
    /// `EOPNOTSUPP`
    NotSupported = 23 => EOPNOTSUPP,
    /// `ENOSYS`: an operation this server does not implement.
    NoSys = 24 => ENOSYS,
    /// `ETIMEDOUT`: a deadline passed (the client's, during an outage).
    TimedOut = 25 => ETIMEDOUT,
    /// `EINTR`
    Interrupted = 26 => EINTR,
    /// `ETXTBSY`
    TextBusy = 27 => ETXTBSY,
    /// `EOVERFLOW`
    Overflow = 28 => EOVERFLOW,
    /// `ERANGE`
    Range = 29 => ERANGE,
    /// `ENODATA`
    NoData = 30 => ENODATA,
    /// `EPROTO`: a message out of place, or a protocol version mismatch.
    Protocol = 31 => EPROTO,
    /// `ENOTCONN`: the connection is gone and could not be made again.
    NotConnected = 32 => ENOTCONN,
    /// `ESTALE`: a handle opened before a reconnect that can no longer be reopened.
    Stale = 33 => ESTALE,
    /// `EMFILE`: the session holds too many open files.
    TooManyFiles = 34 => EMFILE,
    /// `ENXIO`
    NoDevice = 35 => ENXIO,
    /// `ESPIPE`
    IllegalSeek = 36 => ESPIPE,
    /// `ENOMEM`
    NoMemory = 37 => ENOMEM,
    /// `ECANCELED`
    Canceled = 38 => ECANCELED,
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.wire()
    }
}

impl From<&io::Error> for ErrorCode {
    fn from(e: &io::Error) -> ErrorCode {
        match e.raw_os_error() {
            Some(errno) => ErrorCode::from_errno(errno),
            None => match e.kind() {
                io::ErrorKind::NotFound => ErrorCode::NotFound,
                io::ErrorKind::PermissionDenied => ErrorCode::Access,
                io::ErrorKind::AlreadyExists => ErrorCode::Exists,
                io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorCode::Invalid,
                io::ErrorKind::TimedOut => ErrorCode::TimedOut,
                io::ErrorKind::WouldBlock => ErrorCode::WouldBlock,
                io::ErrorKind::Interrupted => ErrorCode::Interrupted,
                io::ErrorKind::Unsupported => ErrorCode::NotSupported,
                io::ErrorKind::OutOfMemory => ErrorCode::NoMemory,
                io::ErrorKind::NotConnected
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => ErrorCode::NotConnected,
                _ => ErrorCode::Io,
            },
        }
    }
}

impl From<io::Error> for ErrorCode {
    fn from(e: io::Error) -> ErrorCode {
        ErrorCode::from(&e)
    }
}

impl From<ErrorCode> for io::Error {
    fn from(c: ErrorCode) -> io::Error {
        io::Error::from_raw_os_error(c.errno())
    }
}

impl fmt::Display for ErrorCode {
    /// The system's own text for the errno ("Disk quota exceeded"), without the "(os error N)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = io::Error::from_raw_os_error(self.errno()).to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        f.write_str(text)
    }
}

impl std::error::Error for ErrorCode {}

/// An error answer: the code decides what the client does, the message adds detail for people
/// (e.g. "needs 4.2 GiB, 1.1 GiB free"). The message never carries a server path or a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    /// An error with a detail message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into() }
    }
}

impl From<ErrorCode> for WireError {
    fn from(code: ErrorCode) -> WireError {
        WireError { code, message: String::new() }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} ({})", self.code, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_one_to_one() {
        let mut errnos = std::collections::HashSet::new();
        let mut wires = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_errno(c.errno()), c, "{c:?}");
            assert_eq!(ErrorCode::from(c.wire()), c, "{c:?}");
            assert!(errnos.insert(c.errno()), "errno of {c:?} is taken twice");
            assert!(wires.insert(c.wire()), "wire number of {c:?} is taken twice");
            let io: io::Error = c.into();
            assert_eq!(ErrorCode::from(&io), c);
        }
        assert_eq!(ErrorCode::from(60000u16), ErrorCode::Io);
    }

    #[test]
    fn displays_the_system_text() {
        assert_eq!(ErrorCode::QuotaExceeded.to_string(), "Disk quota exceeded");
        assert_eq!(ErrorCode::NotEmpty.to_string(), "Directory not empty");
        let e = WireError::new(ErrorCode::QuotaExceeded, "needs 10 B, 3 B free");
        assert_eq!(e.to_string(), "Disk quota exceeded (needs 10 B, 3 B free)");
    }
}
