//! Where a user may go and how much they may store: the storage root, each user's [`Jail`], and
//! their quota. [`Homes`] is the registry the session layer asks at login.
//!
//! OWNED BY: the fsd-ops work (home/, ops/). The session layer uses only what is declared here.

pub mod jail;
pub mod notices;
pub mod quota;

pub use jail::Jail;
pub use notices::{NoticeHub, Subscription};
pub use quota::{LocalLedger, QuotaError, QuotaLedger, Reservation};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::OnceCell;

/// One user's home, shared by all of that user's sessions.
pub struct UserHome {
    /// The user's name (validated by accounts: safe as a directory name).
    pub user: String,
    /// The only way to reach the user's files.
    pub jail: Jail,
    /// Usage against the quota, shared by every session of the user.
    pub quota: Arc<dyn QuotaLedger>,
    /// Change notices between the user's sessions (never across users: one hub per home).
    pub notices: Arc<NoticeHub>,
}

/// A home being opened or open: concurrent first logins of one user wait for one scan and share
/// one ledger (two ledgers for one user would let their writers overshoot together).
type HomeCell = Arc<OnceCell<Arc<UserHome>>>;

/// The storage root and the homes opened so far.
pub struct Homes {
    /// The storage root, opened once at startup (the server's one ambient-authority open).
    root: Arc<OwnedFd>,
    /// Homes by user name; guarded for map lookups and inserts only, never across the scan.
    open: Mutex<HashMap<String, HomeCell>>,
}

impl Homes {
    /// Opens the storage root (the one ambient-authority open of the server, done at startup).
    ///
    /// # Errors
    /// When the root cannot be opened as a directory.
    pub fn open_root(storage_root: &Path) -> io::Result<Homes> {
        let root = rustix::fs::open(storage_root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Homes { root: Arc::new(root), open: Mutex::new(HashMap::new()) })
    }

    /// The home of `user`, created (mode 0700) if missing; its usage is scanned the first time.
    /// Later calls apply `quota_bytes` to the open home (the users file may have changed).
    ///
    /// # Errors
    /// When the name cannot be a directory name, or the home cannot be created, opened or scanned.
    pub async fn open(&self, user: &str, quota_bytes: u64) -> io::Result<Arc<UserHome>> {
        check_user_name(user)?;
        let cell = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(open.entry(user.to_owned()).or_default())
        };
        let root = Arc::clone(&self.root);
        let name = user.to_owned();
        let home = cell
            .get_or_try_init(|| async move {
                let opened = tokio::task::spawn_blocking(move || open_home(&root, &name, quota_bytes))
                    .await
                    .map_err(|e| io::Error::other(format!("opening a home failed: {e}")))?;
                opened.map(Arc::new)
            })
            .await?;
        home.quota.set_limit(quota_bytes);
        Ok(Arc::clone(home))
    }

    /// Applies a quota from a reloaded users file to an open home (no-op if not open). A new
    /// limit is announced to the user's subscribed sessions as a change of the home (mounts keep
    /// their usage figures until a change notice says they moved).
    pub fn set_quota(&self, user: &str, quota_bytes: u64) {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(home) = open.get(user).and_then(|cell| cell.get()) {
            if home.quota.limit() != quota_bytes {
                home.quota.set_limit(quota_bytes);
                home.notices.publish(notices::NO_SESSION, &[homefs_shared::WirePath::root()]);
            }
        }
    }

    /// Forgets an open home (user deleted); its sessions keep their `Arc` until they end.
    pub fn forget(&self, user: &str) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(user);
    }
}

/// Accounts validates names; this refuses anything that is not one plain directory name anyway,
/// since it is joined to the storage root.
fn check_user_name(user: &str) -> io::Result<()> {
    if user.is_empty() || user == "." || user == ".." || user.contains(['/', '\0']) || user.len() > 255 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{user:?} cannot be a home directory name")));
    }
    Ok(())
}

/// Creates (0700) and opens `root/user` (no symlinks, nothing outside the root), and scans it.
fn open_home(root: &OwnedFd, user: &str, quota_bytes: u64) -> io::Result<UserHome> {
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let dir = match rustix::fs::openat2(root, user, flags, Mode::empty(), how) {
        Ok(dir) => dir,
        Err(Errno::NOENT) => {
            match rustix::fs::mkdirat(root, user, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            rustix::fs::openat2(root, user, flags, Mode::empty(), how)?
        }
        Err(e) => return Err(e.into()),
    };
    let used = scan_fd(&dir)?;
    tracing::debug!(user, used, quota_bytes, "home opened");
    Ok(UserHome {
        user: user.to_owned(),
        jail: Jail::new(dir),
        quota: Arc::new(LocalLedger::new(quota_bytes, used)),
        notices: Arc::new(NoticeHub::default()),
    })
}

/// The apparent size of everything under `dir`, each inode counted once (as `du --apparent-size`),
/// for `fsd user list` and the scan at first open. Counts regular files and symlinks; directories
/// are not counted (see [`quota`]).
///
/// # Errors
/// When the tree cannot be read.
pub fn scan_usage(dir: &Path) -> io::Result<u64> {
    let fd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    scan_fd(&fd)
}

/// Whether an inode with this type counts towards usage.
pub(crate) fn is_counted(file_type: FileType) -> bool {
    matches!(file_type, FileType::RegularFile | FileType::Symlink)
}

/// Depth-first walk without following symlinks. Each directory is read completely and closed
/// before its subdirectories are entered, except for the chain of ancestors, so open fds grow
/// with depth only.
fn scan_fd(top: &OwnedFd) -> io::Result<u64> {
    let mut used = 0u64;
    // Inodes with more than one link, already counted.
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    // (directory, its subdirectories not yet entered)
    let mut stack: Vec<(OwnedFd, Vec<OsString>)> = Vec::new();
    let first = rustix::fs::openat(top, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let subdirs = scan_one(&first, &mut used, &mut seen)?;
    stack.push((first, subdirs));
    while let Some((dir, pending)) = stack.last_mut() {
        let Some(name) = pending.pop() else {
            stack.pop();
            continue;
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let child = match rustix::fs::openat(dir.as_fd(), &name, flags, Mode::empty()) {
            Ok(child) => child,
            // Removed or replaced (by a symlink) since it was listed: nothing to count there.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
            Err(e) => return Err(e.into()),
        };
        let subdirs = scan_one(&child, &mut used, &mut seen)?;
        stack.push((child, subdirs));
    }
    Ok(used)
}

/// Adds the sizes of `dir`'s entries to `used`; returns the names of its subdirectories.
fn scan_one(dir: &OwnedFd, used: &mut u64, seen: &mut HashSet<(u64, u64)>) -> io::Result<Vec<OsString>> {
    let reader = rustix::fs::openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mut entries = Dir::new(reader)?;
    let mut subdirs = Vec::new();
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type == FileType::Directory {
            subdirs.push(name.to_owned());
        } else if is_counted(file_type) && (st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino))) {
            *used += u64::try_from(st.st_size).unwrap_or(0);
        }
    }
    Ok(subdirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_each_inode_once_and_skips_directories() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let p = tmp.path();
        std::fs::create_dir_all(p.join("a/b/c")).expect("mkdir");
        std::fs::write(p.join("a/one"), vec![1u8; 1000]).expect("write");
        std::fs::write(p.join("a/b/c/two"), vec![2u8; 24]).expect("write");
        std::fs::hard_link(p.join("a/one"), p.join("a/b/one-again")).expect("link");
        std::os::unix::fs::symlink("a/one", p.join("sym")).expect("symlink");
        let sparse = std::fs::File::create(p.join("sparse")).expect("create");
        sparse.set_len(1 << 30).expect("truncate up");
        assert_eq!(scan_usage(p).expect("scan"), 1000 + 24 + 5 + (1 << 30));
    }

    #[tokio::test]
    async fn homes_are_created_private_and_shared_between_opens() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        let homes = Homes::open_root(tmp.path()).expect("root");
        let a = homes.open("alice", 100).await.expect("open");
        let mode = std::fs::metadata(tmp.path().join("alice")).expect("home exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let b = homes.open("alice", 200).await.expect("open again");
        assert!(Arc::ptr_eq(&a, &b), "one home, one ledger per user");
        assert_eq!(a.quota.limit(), 200, "a later login applies the current quota");
        homes.set_quota("alice", 300);
        assert_eq!(a.quota.limit(), 300);
        for bad in ["", ".", "..", "a/b"] {
            assert!(homes.open(bad, 1).await.is_err(), "{bad:?} refused");
        }
        std::os::unix::fs::symlink("/etc", tmp.path().join("mallory")).expect("symlink");
        assert!(homes.open("mallory", 1).await.is_err(), "a home that is a symlink is refused");
    }
}
