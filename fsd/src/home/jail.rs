//! The jail: the only code that turns a [`WirePath`] into a file descriptor. Every path is resolved
//! by the kernel (`openat2` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`) beneath the home's
//! directory fd, never by string checks, and blocking work runs through [`Jail::run`].
//!
//! Why `IN_ROOT` rather than `BENEATH`: with `IN_ROOT` the home behaves as `/` for the lookup, so
//! `..` at the top stays at the top and an absolute symlink target (`/etc`) resolves against the
//! home, as it would for a chrooted user. `BENEATH` would refuse both with `EXDEV`, which breaks
//! ordinary trees (e.g. a `git` checkout or a tarball with absolute links) without making anything
//! safer. A symlink swapped in during a race is resolved by the same rules, so it stays inside too.

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use homefs_shared::{ErrorCode, WirePath};

/// How every client path is resolved: the home is the root; `/proc/self/fd`-style magic links,
/// which could jump anywhere, are refused (`ELOOP`).
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// How often `openat2` is retried on `EAGAIN`. With `IN_ROOT`/`BENEATH` the kernel answers `EAGAIN`
/// when a rename or mount anywhere on the system raced with a `..` step of the lookup, because it
/// can then no longer prove the walk stayed inside; the lookup is safe to repeat. cap-std retries
/// the same way; a handful of tries covers a busy system, and past that the error reaches the client.
const EAGAIN_RETRIES: usize = 8;

/// Set once the kernel refused `RESOLVE_CACHED` (before Linux 5.12): [`Jail::open_cached`] then
/// declines at once instead of making a syscall that fails every time.
static NO_RESOLVE_CACHED: AtomicBool = AtomicBool::new(false);

/// A user's home as a directory capability. Cloning is cheap (one `Arc`).
#[derive(Clone, Debug)]
pub struct Jail {
    /// The home directory, opened `O_RDONLY | O_DIRECTORY`.
    dir: Arc<OwnedFd>,
}

impl Jail {
    /// A jail over an open directory. Only [`super::Homes`] makes one, from an fd it opened
    /// beneath the storage root.
    pub(crate) fn new(dir: OwnedFd) -> Jail {
        Jail { dir: Arc::new(dir) }
    }

    /// The home directory itself.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Runs blocking work for one request on tokio's blocking pool: one hop per request, not per
    /// syscall. A panic in `work` becomes an `EIO` error for that request only.
    ///
    /// # Errors
    /// Whatever `work` returns, or `EIO` when it panicked.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&Jail) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<io::Error> + Send + 'static,
    {
        let jail = self.clone();
        match tokio::task::spawn_blocking(move || work(&jail)).await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "blocking file operation failed");
                Err(io::Error::from(ErrorCode::Io).into())
            }
        }
    }

    /// Opens `path` (symlinks followed, inside the home) with `flags` (`O_CLOEXEC` is added).
    ///
    /// # Errors
    /// The path check's code, or the kernel's errno.
    pub fn open(&self, path: &WirePath, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        check(path)?;
        self.open_raw(path.as_bytes(), flags, mode)
    }

    /// Opens `path` as [`Jail::open`] does, but only if every step of the lookup is in the
    /// kernel's cache (`RESOLVE_CACHED`, Linux 5.12): it never waits for the disk, so it may run on
    /// the runtime's threads. `None` when it would have to wait, or on any error (the caller then
    /// takes the usual way, which reports the error properly). Only for flags that cannot change
    /// anything (`O_PATH`, no `O_CREAT`/`O_TRUNC`): the kernel refuses the rest.
    pub fn open_cached(&self, path: &WirePath, flags: OFlags) -> Option<OwnedFd> {
        if NO_RESOLVE_CACHED.load(Ordering::Relaxed) {
            return None;
        }
        path.check().ok()?;
        let how = RESOLVE.union(ResolveFlags::CACHED);
        let name = OsStr::from_bytes(path.as_bytes());
        match rustix::fs::openat2(self.dir(), name, flags | OFlags::CLOEXEC, Mode::empty(), how) {
            Ok(fd) => Some(fd),
            // A kernel before 5.12 does not know RESOLVE_CACHED: stop asking it.
            Err(Errno::INVAL) => {
                NO_RESOLVE_CACHED.store(true, Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }

    /// The directory holding the last name of `path` (opened `O_PATH`, for `*at` calls with
    /// lstat semantics on that name) and the name. The home itself is `(home, ".")`, so `*at`
    /// calls act on the home (`mkdir .` gives `EEXIST`, `rmdir .` gives `EINVAL`, as locally).
    ///
    /// # Errors
    /// `EINVAL` when the last name is `..` (an `*at` call on it would leave the parent's
    /// resolution, and with it the jail); otherwise as [`Jail::open`].
    pub fn parent<'p>(&self, path: &'p WirePath) -> io::Result<(OwnedFd, &'p OsStr)> {
        check(path)?;
        let flags = OFlags::PATH | OFlags::DIRECTORY;
        let Some((parent, name)) = path.split_last() else {
            return Ok((self.open_raw(b".", flags, Mode::empty())?, OsStr::new(".")));
        };
        if name == b".." {
            tracing::warn!(path = ?path, "jail: `..` as the last name refused");
            return Err(io::Error::from(ErrorCode::Invalid));
        }
        let fd = self.open_raw(parent.as_bytes(), flags, Mode::empty())?;
        Ok((fd, OsStr::from_bytes(name)))
    }

    /// `openat2` beneath the home with [`RESOLVE`], retried on `EAGAIN`.
    fn open_raw(&self, path: &[u8], flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let path = OsStr::from_bytes(path);
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(self.dir(), path, flags | OFlags::CLOEXEC, mode, RESOLVE) {
                Ok(fd) => return Ok(fd),
                // See EAGAIN_RETRIES.
                Err(Errno::AGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                // EXDEV: the kernel refused a step out of the home (IN_ROOT clamps `..` instead,
                // so this is not expected; logged if it ever happens). ELOOP: a /proc-style magic
                // link refused by NO_MAGICLINKS, or merely a symlink loop. Neither is followed.
                Err(e @ (Errno::XDEV | Errno::LOOP)) => {
                    tracing::warn!(path = ?path, errno = %e, "jail: resolution refused");
                    return Err(e.into());
                }
                // ENOSYS (kernel before 5.6) is not worked around: without openat2 there is no
                // kernel-enforced jail, and fsd refuses to serve rather than fall back to strings.
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The path limits of [`WirePath::check`] as the errno the client should see; logs a path that
/// climbs above the home (the kernel keeps it inside; the log shows who tried).
fn check(path: &WirePath) -> io::Result<()> {
    path.check().map_err(|e| io::Error::from(e.code()))?;
    let mut depth: i64 = 0;
    for c in path.components() {
        depth += if c == b".." { -1 } else { 1 };
        if depth < 0 {
            tracing::warn!(path = ?path, "jail: path climbs above the home; kept inside");
            break;
        }
    }
    Ok(())
}
