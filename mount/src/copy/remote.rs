//! Where a netcp argument points: a local path, or `[USER@]HOST[:PORT]:PATH` on a server; and the
//! lexical arithmetic of remote paths (the shell's client-side working directory).
//!
//! The rule, also printed by `netcp --help`:
//! - An argument with no `:`, or with a `/` before its first `:`, is local (`./a:b`, `/tmp/x:y`).
//! - `[V6ADDR]` in brackets is a host: `[::1]:PATH`, `[::1]:7373:PATH`, `alice@[::1]:PATH`.
//! - Otherwise the host (with an optional `USER@`) ends at the first `:`. If what follows is all
//!   digits and another `:`, those digits are the port: `host:7373:PATH`; else it is the path, so
//!   `host:7373` is the file `7373` in the home (write `host:7373:` for the home on port 7373).
//! - An empty PATH is the home; a relative PATH is relative to the home, and so is an absolute one
//!   (the home is the remote root).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use homefs_shared::{PathError, WirePath};

/// One SOURCE or DEST argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path on this machine.
    Local(PathBuf),
    /// A path on a server: `server` is `[USER@]HOST[:PORT]` for `ServerAddr::parse`, `path` the raw
    /// bytes after it (may be empty: the home).
    Remote { server: String, path: Vec<u8> },
}

impl Location {
    /// Reads one argument by the rule in this module's doc.
    pub fn parse(arg: &OsStr) -> Location {
        let bytes = arg.as_bytes();
        let local = || Location::Local(PathBuf::from(arg));
        // Brackets: an IPv6 host, with an optional USER@ before it.
        let bracket_start = match bytes.iter().position(|&b| b == b'@') {
            Some(at) if bytes.get(at + 1) == Some(&b'[') && !bytes[..at].contains(&b'/') => Some(at + 1),
            _ if bytes.first() == Some(&b'[') => Some(0),
            _ => None,
        };
        let host_end = match bracket_start {
            Some(start) => match bytes[start..].iter().position(|&b| b == b']') {
                Some(close) if bytes.get(start + close + 1) == Some(&b':') => start + close + 1,
                _ => return local(),
            },
            None => match bytes.iter().position(|&b| b == b':') {
                Some(colon) if colon > 0 && !bytes[..colon].contains(&b'/') => colon,
                _ => return local(),
            },
        };
        let host = &bytes[..host_end];
        let rest = &bytes[host_end + 1..];
        let (port, path) = match rest.iter().position(|&b| b == b':') {
            Some(colon) if colon > 0 && rest[..colon].iter().all(u8::is_ascii_digit) => {
                (Some(&rest[..colon]), &rest[colon + 1..])
            }
            _ => (None, rest),
        };
        let mut server = String::from_utf8_lossy(host).into_owned();
        if let Some(port) = port {
            server.push(':');
            server.push_str(&String::from_utf8_lossy(port));
        }
        Location::Remote { server, path: path.to_vec() }
    }

    /// Whether this is a remote path.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }
}

/// A remote path argument as a [`WirePath`]: empty is the home, a leading `/` is the home.
///
/// # Errors
/// [`PathError`] for a NUL byte or a path over the limits.
pub fn wire_path(path: &[u8]) -> Result<WirePath, PathError> {
    let trimmed: Vec<u8> = path.to_vec();
    if trimmed.iter().all(|&b| b == b'/' || b == b'.') && !trimmed.windows(2).any(|w| w == b"..") {
        return Ok(WirePath::root());
    }
    WirePath::new(trimmed)
}

/// The last name of a remote path (`None` for the home and for a path ending in `..`).
pub fn last_name(path: &WirePath) -> Option<Vec<u8>> {
    path.components().last().filter(|c| *c != b"..").map(<[u8]>::to_vec)
}

/// The client-side working directory of the shell: components below the home, no `.` or `..`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteCwd {
    parts: Vec<Vec<u8>>,
}

impl RemoteCwd {
    /// `arg` resolved against this directory, lexically: `/` starts at the home, `..` goes up and
    /// stops at the home (the server's jail would keep it there anyway), `.` and empty names vanish.
    pub fn resolve(&self, arg: &[u8]) -> RemoteCwd {
        let mut parts = if arg.first() == Some(&b'/') { Vec::new() } else { self.parts.clone() };
        for c in arg.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    parts.pop();
                }
                name => parts.push(name.to_vec()),
            }
        }
        RemoteCwd { parts }
    }

    /// As a path to send.
    ///
    /// # Errors
    /// [`PathError`] when the joined path is over the limits.
    pub fn wire(&self) -> Result<WirePath, PathError> {
        if self.parts.is_empty() {
            return Ok(WirePath::root());
        }
        WirePath::new(self.parts.join(&b'/'))
    }

    /// As shown to the user: `/` is the home.
    pub fn display(&self) -> String {
        let joined: Vec<u8> = self.parts.join(&b'/');
        format!("/{}", String::from_utf8_lossy(&joined))
    }

    /// The last name, if this is not the home.
    pub fn name(&self) -> Option<&[u8]> {
        self.parts.last().map(Vec::as_slice)
    }
}

/// A remote name as a local file name, unchanged bytes (non-UTF-8 names round-trip).
pub fn local_name(name: &[u8]) -> OsString {
    OsString::from_vec(name.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(server: &str, path: &str) -> Location {
        Location::Remote { server: server.into(), path: path.as_bytes().to_vec() }
    }

    #[test]
    fn parses_the_documented_forms() {
        let p = |s: &str| Location::parse(OsStr::new(s));
        assert_eq!(p("host:path"), remote("host", "path"));
        assert_eq!(p("host:7373:path"), remote("host:7373", "path"));
        assert_eq!(p("alice@host:dir/f"), remote("alice@host", "dir/f"));
        assert_eq!(p("alice@host:7373:/abs"), remote("alice@host:7373", "/abs"));
        assert_eq!(p("[::1]:7373:path"), remote("[::1]:7373", "path"));
        assert_eq!(p("[::1]:path"), remote("[::1]", "path"));
        assert_eq!(p("bob@[::1]:7373:"), remote("bob@[::1]:7373", ""));
        assert_eq!(p("host:"), remote("host", ""));
        assert_eq!(p("host:7373"), remote("host", "7373"));
        assert_eq!(p("host:a:b"), remote("host", "a:b"));
        assert_eq!(p("file"), Location::Local("file".into()));
        assert_eq!(p("./a:b"), Location::Local("./a:b".into()));
        assert_eq!(p("/tmp/x:y"), Location::Local("/tmp/x:y".into()));
        assert_eq!(p(":x"), Location::Local(":x".into()));
        assert_eq!(p("[::1"), Location::Local("[::1".into()));
    }

    #[test]
    fn non_utf8_remote_path_kept() {
        let arg = OsStr::from_bytes(b"h:caf\xe9");
        assert_eq!(Location::parse(arg), Location::Remote { server: "h".into(), path: b"caf\xe9".to_vec() });
    }

    #[test]
    fn cwd_is_normalised() {
        let home = RemoteCwd::default();
        let d = home.resolve(b"a/b/./c");
        assert_eq!(d.display(), "/a/b/c");
        assert_eq!(d.resolve(b"../..").display(), "/a");
        assert_eq!(d.resolve(b"../../../../..").display(), "/");
        assert_eq!(d.resolve(b"/x//y/").display(), "/x/y");
        assert_eq!(home.wire().unwrap(), WirePath::root());
        assert_eq!(d.wire().unwrap().as_bytes(), b"a/b/c");
    }

    #[test]
    fn wire_paths() {
        assert_eq!(wire_path(b"").unwrap(), WirePath::root());
        assert_eq!(wire_path(b"/").unwrap(), WirePath::root());
        assert_eq!(wire_path(b"a/b").unwrap().as_bytes(), b"a/b");
        assert_eq!(last_name(&WirePath::new("a/b/").unwrap()), Some(b"b".to_vec()));
        assert_eq!(last_name(&WirePath::root()), None);
    }
}
