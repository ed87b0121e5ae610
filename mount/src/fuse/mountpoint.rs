//! The mountpoint: checked before anything is mounted (missing, not a directory, already a
//! mount point, a dead mount), and unmounted with `fusermount3 -u`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `fusermount3 -u` may take before we give up on it.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a directory cannot be mounted on (or unmounted); each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum MountpointError {
    #[error("mountpoint {0} does not exist")]
    Missing(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    NotDir(PathBuf),
    #[error("mountpoint {0} is busy: something is already mounted there")]
    Busy(PathBuf),
    #[error("mountpoint {0} is a dead mount (Transport endpoint is not connected); run: netmount -u {0}")]
    Dead(PathBuf),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("mountpoint {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot unmount {path}: {reason}")]
    Unmount { path: PathBuf, reason: String },
}

/// Checks that `path` can be mounted on; returns it made absolute (as it will appear in
/// /proc/mounts).
///
/// # Errors
/// [`MountpointError`] saying what is wrong with it.
pub fn check(path: &Path) -> Result<PathBuf, MountpointError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MountpointError::Missing(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(MountpointError::Dead(path.to_path_buf())),
        Err(e) => return Err(MountpointError::Io { path: path.to_path_buf(), source: e }),
    };
    if !meta.is_dir() {
        return Err(MountpointError::NotDir(path.to_path_buf()));
    }
    let abs = path.canonicalize().map_err(|e| MountpointError::Io { path: path.to_path_buf(), source: e })?;
    if is_mount_point(&abs).map_err(|e| MountpointError::Io { path: path.to_path_buf(), source: e })? {
        return Err(MountpointError::Busy(path.to_path_buf()));
    }
    Ok(abs)
}

/// Whether `abs` (an absolute path) is listed as a mount point in /proc/self/mountinfo.
///
/// # Errors
/// When /proc/self/mountinfo cannot be read.
pub fn is_mount_point(abs: &Path) -> io::Result<bool> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    let target = abs.as_os_str().as_encoded_bytes();
    Ok(info
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .any(|field| unescape(field) == target))
}

/// The absolute form of a mountpoint that may be a dead mount (where `canonicalize` fails).
fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() && field[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let n = field[i + 1..i + 4].iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'));
            out.push(n as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts `path` with `fusermount3 -u` (with `-z`, lazily: even while files are open).
///
/// # Errors
/// When it is not mounted, or fusermount3 fails or takes longer than [`UNMOUNT_TIMEOUT`].
pub fn unmount(path: &Path, lazy: bool) -> Result<(), MountpointError> {
    let abs = absolute(path);
    if !is_mount_point(&abs).unwrap_or(true) {
        return Err(MountpointError::NotMounted(path.to_path_buf()));
    }
    let fail = |reason: String| MountpointError::Unmount { path: path.to_path_buf(), reason };
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let mut child = cmd
        .arg("--")
        .arg(&abs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run fusermount3: {e}")))?;
    let deadline = Instant::now() + UNMOUNT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(_)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = io::Read::read_to_string(&mut e, &mut err);
                }
                let line = err.lines().next().unwrap_or("fusermount3 failed").trim().to_string();
                return Err(fail(line));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("fusermount3 did not finish within {UNMOUNT_TIMEOUT:?}")));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape(br"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape(br"/x\04"), br"/x\04");
    }

    #[test]
    fn checks_missing_and_not_dir() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(check(&missing), Err(MountpointError::Missing(_))));
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(check(&file), Err(MountpointError::NotDir(_))));
        assert!(check(dir.path()).is_ok());
        assert!(matches!(check(Path::new("/proc")), Err(MountpointError::Busy(_))));
    }
}
