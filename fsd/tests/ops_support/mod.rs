//! The storage-root fixture of fsd's operation tests (`ops_session.rs`, `whole_file.rs`): homes in
//! a temp dir (or a tmpfs, for full-disk tests) with an `outside` directory beside them holding a
//! file no user may reach.
// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use fsd::home::Homes;
use fsd::ops::{AuthedSession, LockTable};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A storage root with an `outside` directory beside it holding a file no user may reach.
/// Fields drop in order: the homes' fds close before the tmpfs (if any) is unmounted, and that
/// before the temp dir is removed.
pub struct Fixture {
    pub homes: Homes,
    pub locks: Arc<LockTable>,
    next_session: AtomicU64,
    pub tmpfs: Option<Tmpfs>,
    tmp: tempfile::TempDir,
}

/// A tmpfs mounted for one test; unmounted on drop.
pub struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=`) at `at`. `None`, with the reason printed,
    /// when that is impossible here (not root); fails under `HOMEFS_REQUIRE_FUSE=1`, as CI
    /// runs as root.
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let required = std::env::var_os("HOMEFS_REQUIRE_FUSE").is_some_and(|v| v == "1");
        if !rustix::process::geteuid().is_root() {
            assert!(!required, "this test mounts a tmpfs and needs root (HOMEFS_REQUIRE_FUSE=1 is set)");
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "homefs-test"])
            .arg(at)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(!required, "mount -t tmpfs failed (HOMEFS_REQUIRE_FUSE=1 is set): {why}");
            eprintln!("skipped: mount -t tmpfs failed: {why}");
            return None;
        }
        Some(Tmpfs { at: at.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = std::process::Command::new("umount");
            if lazy {
                cmd.arg("--lazy");
            }
            cmd.arg(&self.at).status().is_ok_and(|s| s.success())
        };
        // Lazily if something still holds it open, so the temp dir can go either way.
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount the tmpfs at {}", self.at.display());
        }
    }
}

pub const SECRET: &[u8] = b"outside the jail";

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(tmp.path().join("storage")).expect("storage root");
        std::fs::create_dir(tmp.path().join("outside")).expect("outside dir");
        std::fs::write(tmp.path().join("outside/secret"), SECRET).expect("outside file");
        let homes = Homes::open_root(&tmp.path().join("storage")).expect("open root");
        Fixture { homes, locks: Arc::new(LockTable::default()), next_session: AtomicU64::new(1), tmpfs: None, tmp }
    }

    /// A fixture whose storage root is a tmpfs of `size`; `None` when one cannot be mounted.
    pub fn on_tmpfs(size: &str) -> Option<Fixture> {
        let tmp = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(tmp.path().join("storage")).expect("storage root");
        std::fs::create_dir(tmp.path().join("outside")).expect("outside dir");
        std::fs::write(tmp.path().join("outside/secret"), SECRET).expect("outside file");
        let tmpfs = Tmpfs::mount(&tmp.path().join("storage"), size)?;
        let homes = Homes::open_root(&tmp.path().join("storage")).expect("open root");
        let locks = Arc::new(LockTable::default());
        Some(Fixture { homes, locks, next_session: AtomicU64::new(1), tmpfs: Some(tmpfs), tmp })
    }

    pub async fn session(&self, user: &str, quota: u64) -> AuthedSession {
        let home = self.homes.open(user, quota).await.expect("open home");
        AuthedSession::new(home, Arc::clone(&self.locks), self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    pub fn home(&self, user: &str) -> PathBuf {
        self.tmp.path().join("storage").join(user)
    }

    pub fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// The outside file is unchanged and nothing new appeared beside it or the storage root.
    pub fn assert_outside_untouched(&self) {
        assert_eq!(std::fs::read(self.outside().join("secret")).expect("secret"), SECRET);
        assert_eq!(std::fs::metadata(self.outside().join("secret")).expect("secret").len(), SECRET.len() as u64);
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p).expect("list").map(|e| e.expect("entry").file_name()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&self.outside()), vec!["secret"]);
        assert_eq!(names(self.tmp.path()), vec!["outside", "storage"]);
    }
}
