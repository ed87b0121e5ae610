//! Where a user may go and how much they may store: the storage root, each user's [`Jail`], and
//! their quota. [`Homes`] is the registry the session layer asks at login.
//!
//! OWNED BY: the fsd-ops work (home/, ops/). The session layer uses only what is declared here.

pub mod jail;
pub mod quota;

pub use jail::Jail;
pub use quota::{QuotaLedger, Reservation};

use std::io;
use std::path::Path;
use std::sync::Arc;

/// One user's home, shared by all of that user's sessions.
pub struct UserHome {
    /// The user's name (validated by accounts: safe as a directory name).
    pub user: String,
    /// The only way to reach the user's files.
    pub jail: Jail,
    /// Usage against the quota, shared by every session of the user.
    pub quota: Arc<dyn QuotaLedger>,
}

/// The storage root and the homes opened so far.
pub struct Homes {
    // private fields: see the implementation
    _private: (),
}

impl Homes {
    /// Opens the storage root (the one ambient-authority open of the server, done at startup).
    ///
    /// # Errors
    /// When the root cannot be opened as a directory.
    pub fn open_root(_storage_root: &Path) -> io::Result<Homes> {
        todo!("fsd-ops")
    }

    /// The home of `user`, created (mode 0700) if missing; its usage is scanned the first time.
    ///
    /// # Errors
    /// When the home cannot be created, opened or scanned.
    pub async fn open(&self, _user: &str, _quota_bytes: u64) -> io::Result<Arc<UserHome>> {
        todo!("fsd-ops")
    }

    /// Applies a quota from a reloaded users file to an open home (no-op if not open).
    pub fn set_quota(&self, _user: &str, _quota_bytes: u64) {
        todo!("fsd-ops")
    }

    /// Forgets an open home (user deleted); its sessions keep their `Arc` until they end.
    pub fn forget(&self, _user: &str) {
        todo!("fsd-ops")
    }
}

/// The apparent size of everything under `dir`, each inode counted once (as `du --apparent-size`),
/// for `fsd user list` and the scan at first open.
///
/// # Errors
/// When the tree cannot be read.
pub fn scan_usage(_dir: &Path) -> io::Result<u64> {
    todo!("fsd-ops")
}
