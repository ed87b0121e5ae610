//! [`WirePath`]: a path relative to the user's home, carried as raw bytes so that non-UTF-8 names
//! round-trip unchanged.
//!
//! The wire form is unchecked (a peer may send anything); [`WirePath::check`] is what the server
//! calls before it hands a path to the kernel, and [`WirePath::new`] what a client calls before it
//! sends one. Confinement to the home is *not* done here: the server's jail resolves every path
//! with `openat2(RESOLVE_IN_ROOT)`. These checks only give clear errors for names no file system
//! can hold.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::ErrorCode;

/// Longest name of one path component, as Linux `NAME_MAX`.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest path, as Linux `PATH_MAX`.
pub const MAX_PATH_BYTES: usize = 4096;

/// A path below the user's home, `/`-separated. The home itself is `.` (or `/`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WirePath(Vec<u8>);

/// Why a path cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("a name is longer than 255 bytes")]
    NameTooLong,
    #[error("path is longer than 4096 bytes")]
    PathTooLong,
}

impl PathError {
    /// The errno-backed code a server answers for this path.
    pub fn code(self) -> ErrorCode {
        match self {
            PathError::Empty => ErrorCode::NotFound,
            PathError::Nul => ErrorCode::Invalid,
            PathError::NameTooLong | PathError::PathTooLong => ErrorCode::NameTooLong,
        }
    }
}

impl WirePath {
    /// The user's home.
    pub fn root() -> WirePath {
        WirePath(b".".to_vec())
    }

    /// A checked path.
    ///
    /// # Errors
    /// [`PathError`] for an empty path, a NUL byte, a name over 255 bytes or a path over 4096.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<WirePath, PathError> {
        let p = WirePath(bytes.into());
        p.check()?;
        Ok(p)
    }

    /// Checks the limits listed on [`WirePath::new`]; the server calls it on every path it receives.
    ///
    /// # Errors
    /// As [`WirePath::new`].
    pub fn check(&self) -> Result<(), PathError> {
        if self.0.is_empty() {
            return Err(PathError::Empty);
        }
        if self.0.contains(&0) {
            return Err(PathError::Nul);
        }
        if self.0.len() > MAX_PATH_BYTES {
            return Err(PathError::PathTooLong);
        }
        if self.components().any(|c| c.len() > MAX_NAME_BYTES) {
            return Err(PathError::NameTooLong);
        }
        Ok(())
    }

    /// The raw bytes, as sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The non-empty components other than `.` (`..` is kept: the kernel resolves it in the jail).
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".")
    }

    /// Whether this names the home itself.
    pub fn is_root(&self) -> bool {
        self.components().next().is_none()
    }

    /// This path with one more component. `name` must be a single component.
    ///
    /// # Errors
    /// As [`WirePath::new`], for the joined path.
    pub fn join(&self, name: &[u8]) -> Result<WirePath, PathError> {
        if self.is_root() {
            return WirePath::new(name.to_vec());
        }
        let mut v = self.0.clone();
        if v.last() != Some(&b'/') {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        WirePath::new(v)
    }

    /// The parent path and the last name; `None` for the home itself.
    pub fn split_last(&self) -> Option<(WirePath, &[u8])> {
        let comps: Vec<&[u8]> = self.components().collect();
        let (last, rest) = comps.split_last()?;
        let parent = if rest.is_empty() { WirePath::root() } else { WirePath(rest.join(&b'/')) };
        Some((parent, last))
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(WirePath::new(""), Err(PathError::Empty));
        assert_eq!(WirePath::new(b"a\0b".to_vec()), Err(PathError::Nul));
        assert_eq!(WirePath::new(vec![b'x'; 256]), Err(PathError::NameTooLong));
        assert!(WirePath::new(vec![b'x'; 255]).is_ok());
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".as_slice(), 1025).flatten().copied().collect();
        assert_eq!(WirePath::new(long), Err(PathError::PathTooLong));
    }

    #[test]
    fn split_and_join() {
        let p = WirePath::new("a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent, WirePath::new("a/b").unwrap());
        assert_eq!(name, b"c");
        assert!(WirePath::root().split_last().is_none());
        assert_eq!(WirePath::root().join(b"x").unwrap(), WirePath::new("x").unwrap());
        assert_eq!(WirePath::new("a").unwrap().join(b"\xff").unwrap().as_bytes(), b"a/\xff");
        assert!(WirePath::new("/").unwrap().is_root());
    }
}
