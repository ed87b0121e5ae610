//! Dropping root: after the listener is bound and the files it needs are open, a server started
//! as root switches to the `run_as` user before the runtime (and any thread) exists, then checks
//! that root cannot be regained. The one place `unsafe` may live; safe `nix` calls suffice.

use nix::unistd::{Gid, Uid, User};

/// Why the switch failed; the server must not serve then.
#[derive(Debug, thiserror::Error)]
pub enum PrivsError {
    #[error("run_as: no user {0:?} on this system")]
    NoSuchUser(String),
    #[error("run_as: cannot look up user {name:?}: {error}")]
    Lookup { name: String, error: nix::Error },
    #[error("run_as {name:?}: {step} failed: {error}")]
    Switch { name: String, step: &'static str, error: nix::Error },
    #[error("run_as {0:?}: root privileges could be regained after the switch; refusing to serve")]
    StillRoot(String),
    #[error("run_as {0:?} is root itself; name an unprivileged user")]
    IsRoot(String),
}

/// The user to switch to.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Whether the process runs with root's effective user id.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Looks up `name` in the system's user database.
///
/// # Errors
/// [`PrivsError::NoSuchUser`], [`PrivsError::Lookup`], or [`PrivsError::IsRoot`] for uid 0.
pub fn lookup(name: &str) -> Result<RunAs, PrivsError> {
    let user = User::from_name(name)
        .map_err(|error| PrivsError::Lookup { name: name.to_string(), error })?
        .ok_or_else(|| PrivsError::NoSuchUser(name.to_string()))?;
    if user.uid.is_root() {
        return Err(PrivsError::IsRoot(name.to_string()));
    }
    Ok(RunAs { name: user.name, uid: user.uid, gid: user.gid })
}

/// Switches the whole process to `to`: supplementary groups, then group, then user (real,
/// effective and saved ids), and verifies that `setuid(0)` now fails. Call it while the process
/// has one thread: glibc applies set*id to every thread, but a thread created from a root
/// thread in between would be a window we do not need.
///
/// # Errors
/// [`PrivsError::Switch`] naming the step, or [`PrivsError::StillRoot`].
pub fn drop_to(to: &RunAs) -> Result<(), PrivsError> {
    let step = |step: &'static str| move |error| PrivsError::Switch { name: to.name.clone(), step, error };
    // Groups first: once the uid is dropped, the groups can no longer be changed.
    nix::unistd::setgroups(&[to.gid]).map_err(step("setgroups"))?;
    nix::unistd::setresgid(to.gid, to.gid, to.gid).map_err(step("setresgid"))?;
    nix::unistd::setresuid(to.uid, to.uid, to.uid).map_err(step("setresuid"))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid() != to.uid {
        return Err(PrivsError::StillRoot(to.name.clone()));
    }
    Ok(())
}
