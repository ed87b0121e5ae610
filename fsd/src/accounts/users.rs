//! The users file (`users.toml`): `[users.NAME]` tables with an argon2id PHC string and an
//! optional quota. Loading validates every entry; saving is atomic (temp file, then rename).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::ByteSize;

/// Why the users file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}:{}: {message}", at.map_or_else(String::new, |(l, c)| format!("{l}:{c}")))]
    Parse { path: PathBuf, at: Option<(usize, usize)>, message: String },
    #[error("{path}: user {user:?}: {reason}")]
    Entry { path: PathBuf, user: String, reason: String },
}

/// One user's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// argon2id PHC string (`$argon2id$v=19$m=...`).
    pub password: String,
    /// The user's quota; `None`: the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ByteSize>,
}

/// The whole users file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default)]
    pub users: BTreeMap<String, UserEntry>,
}

/// Whether `name` may be a user name: `^[a-z_][a-z0-9_.-]{0,31}$` (safe as a directory name:
/// never `.` or `..`, never a `/`).
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b[1..].iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'))
}

impl UsersFile {
    /// Reads and validates a users file.
    ///
    /// # Errors
    /// [`UsersError`] naming the file (and the user, for a bad entry).
    pub fn load(path: &Path) -> Result<UsersFile, UsersError> {
        let text = fs::read_to_string(path).map_err(|error| UsersError::Io { path: path.into(), error })?;
        UsersFile::parse(path, &text)
    }

    /// Parses and validates the text of a users file read from `path`.
    ///
    /// # Errors
    /// [`UsersError`] naming the file (and the user, for a bad entry).
    pub fn parse(path: &Path, text: &str) -> Result<UsersFile, UsersError> {
        let file: UsersFile = toml::from_str(text).map_err(|e| {
            let (at, message) = crate::config::toml_error(text, &e);
            UsersError::Parse { path: path.into(), at, message }
        })?;
        for (user, entry) in &file.users {
            let bad = |reason: String| UsersError::Entry { path: path.into(), user: user.clone(), reason };
            if !is_valid_name(user) {
                return Err(bad("not a valid user name (lowercase letters, digits, _ . -; at most 32)".into()));
            }
            let hash = argon2::PasswordHash::new(&entry.password).map_err(|e| bad(format!("password: {e}")))?;
            if hash.algorithm.as_str() != "argon2id" {
                return Err(bad(format!("password: {} is not argon2id", hash.algorithm)));
            }
        }
        Ok(file)
    }

    /// Writes the file atomically: a temporary file (mode 0600) in the same directory, synced,
    /// then renamed over `path`. An existing file's owner is kept, so a file that `fsd init` gave
    /// to the `run_as` user stays readable by the server after `fsd user add` as root.
    ///
    /// # Errors
    /// [`UsersError::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        let io_err = |error| UsersError::Io { path: path.into(), error };
        let mut text = String::from(HEADER);
        text.push_str(&toml::to_string(self).map_err(|e| io_err(io::Error::other(e)))?);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| io_err(io::Error::other("not a file name")))?;
        let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
        let write = || -> io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            if let Ok(old) = fs::metadata(path) {
                if old.uid() != rustix::process::geteuid().as_raw() || old.gid() != rustix::process::getegid().as_raw()
                {
                    std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()))?;
                }
            }
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            // The rename is durable once the directory is synced.
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(e)
        })
    }
}

/// What an empty users file holds, and the head of every saved one.
pub const HEADER: &str = "# fsd users: edit with `fsd user add|passwd|del|quota`; a running fsd re-reads this file.\n\
# [users.NAME] password = \"$argon2id$...\" (PHC string), quota = \"20G\" (optional).\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["alice", "_svc", "a", "bob.smith", "x-1_2", "abcdefghijklmnopqrstuvwxyz012345"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Alice", "1abc", ".", "..", "a/b", "-x", ".hidden", "abcdefghijklmnopqrstuvwxyz0123456", "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        let p = Path::new("users.toml");
        assert!(UsersFile::parse(p, "").unwrap().users.is_empty());
        assert!(UsersFile::parse(p, HEADER).unwrap().users.is_empty());
        let err = UsersFile::parse(p, "[users.x]\npassword = \"plain\"\n").unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        assert!(UsersFile::parse(p, "[users.Bad]\npassword = \"x\"\n").is_err());
        assert!(UsersFile::parse(p, "[users.x]\npasswd = \"x\"\n").is_err());
    }
}
