//! The known_hosts file: servers' certificate fingerprints pinned on first use, as ssh does.
//!
//! One line per server, `host:port SHA256:...`; blank lines and `#` comments are skipped. The file
//! and its directory are created private (0600 / 0700). It lives at
//! `$XDG_CONFIG_HOME/homefs/known_hosts`, else `~/.config/homefs/known_hosts`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Why known_hosts could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KnownHostsError {
    #[error("cannot find a config directory: neither XDG_CONFIG_HOME nor HOME is set")]
    NoHome,
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// The default file: `$XDG_CONFIG_HOME/homefs/known_hosts` or `~/.config/homefs/known_hosts`.
///
/// # Errors
/// [`KnownHostsError::NoHome`] when neither variable is set.
pub fn default_path() -> Result<PathBuf, KnownHostsError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let config = match var("XDG_CONFIG_HOME") {
        Some(dir) => dir,
        None => var("HOME").ok_or(KnownHostsError::NoHome)?.join(".config"),
    };
    Ok(config.join("homefs").join("known_hosts"))
}

/// The fingerprint pinned for `host_port` (`host:port`, see `ServerAddr::host_port`), if any.
/// A missing file knows no host.
///
/// # Errors
/// When the file exists but cannot be read.
pub fn lookup(file: &Path, host_port: &str) -> Result<Option<String>, KnownHostsError> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file, e)),
    };
    Ok(text.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(h), Some(fp)) if h == host_port => Some(fp.to_string()),
            _ => None,
        }
    }))
}

/// Pins `fingerprint` for `host_port`: appends a line, creating the file (0600) and its
/// directory (0700) when missing.
///
/// # Errors
/// When the directory or file cannot be created or written.
pub fn append(file: &Path, host_port: &str, fingerprint: &str) -> Result<(), KnownHostsError> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_err(dir, e))?;
    }
    let mut f = OpenOptions::new().create(true).append(true).mode(0o600).open(file).map_err(|e| io_err(file, e))?;
    writeln!(f, "{host_port} {fingerprint}").map_err(|e| io_err(file, e))
}

fn io_err(path: &Path, source: io::Error) -> KnownHostsError {
    KnownHostsError::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn append_then_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/known_hosts");
        assert_eq!(lookup(&file, "h:1").unwrap(), None);
        append(&file, "h:1", "SHA256:abc").unwrap();
        append(&file, "h:2", "SHA256:def").unwrap();
        assert_eq!(lookup(&file, "h:1").unwrap().as_deref(), Some("SHA256:abc"));
        assert_eq!(lookup(&file, "h:2").unwrap().as_deref(), Some("SHA256:def"));
        assert_eq!(lookup(&file, "h:3").unwrap(), None);
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(file.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
