//! One mount's life: build the state over a logged-in client, mount it (so that a daemon that
//! dies leaves no dead mountpoint), run the FUSE threads until unmounted.

use fuser::{Config, MountOption, Session, SessionACL};
use homefs_shared::WirePath;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokio::runtime::Handle;

use super::attr::Owner;
use super::cache::AttrCache;
use super::creates::Creates;
use super::fs::HomeFs;
use super::handles::Handles;
use super::inodes::InodeTable;
use super::ops::Remote;
use super::options::MountOptions;
use crate::client::Client;

/// FUSE threads reading requests from the kernel. The callbacks never block on the network, so
/// a few threads keep the kernel queue drained; more only add context switches on small hosts.
pub const FUSE_THREADS: usize = 4;

/// The kernel's read-ahead window for the mount, in KiB. The kernel starts every FUSE mount at
/// 128 KiB and ignores a larger `max_readahead` from INIT, so a cold sequential read arrives as
/// 128 KiB READs, each a round trip, with one or two in flight. With 4 MiB, the kernel sends
/// 1 MiB READs (max_pages follows max_write) several at a time (ASYNC_READ, max_background), and
/// the connection stays full. Page cache, not daemon memory: the daemon holds at most the READs
/// in flight.
pub const READ_AHEAD_KB: u32 = 4096;

/// Why mounting failed; one line each.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read the home's attributes: {0}")]
    Root(homefs_shared::WireError),
    #[error("cannot mount on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
}

/// What to mount where.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Absolute path of the mountpoint (checked by [`super::mountpoint::check`]).
    pub mountpoint: PathBuf,
    /// Shown as the source in /proc/mounts and `df`, e.g. `alice@host:7373`.
    pub fsname: String,
    pub options: MountOptions,
}

/// The shared state of a mount over `client`: reads the home's attributes for the root inode.
///
/// # Errors
/// [`MountError::Root`] when the home cannot be stat'ed.
pub async fn prepare(client: Client, options: &MountOptions) -> Result<Arc<Remote>, MountError> {
    let root = client.stat(&WirePath::root()).await.map_err(MountError::Root)?;
    Ok(Arc::new(Remote {
        client,
        inodes: InodeTable::new(&root),
        cache: AttrCache::new(options.cache_ttl),
        handles: Handles::new(),
        owner: Owner::current(),
        read_only: options.read_only,
        notifier: OnceLock::new(),
        hits: Default::default(),
        writes: Default::default(),
        prefetch: Default::default(),
        creates: Creates::new(options.create_behind),
        notices: Default::default(),
        usage: Default::default(),
    }))
}

/// A mounted file system, not yet serving (the kernel has sent INIT and been answered).
pub struct Mounted {
    session: Session<HomeFs>,
    /// Whether fusermount3 will unmount if this process dies.
    pub auto_unmount: bool,
}

fn config(spec: &MountSpec, auto_unmount: bool) -> Config {
    let o = &spec.options;
    let mut mount_options = vec![
        MountOption::FSName(spec.fsname.clone()),
        MountOption::Subtype("homefs".into()),
        // The kernel checks permissions against the attributes we report (owner = the user
        // who mounted), as for a local file system; the server checks again.
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    mount_options.push(if o.read_only { MountOption::RO } else { MountOption::RW });
    if o.noexec {
        mount_options.push(MountOption::NoExec);
    }
    if o.noatime {
        mount_options.push(MountOption::NoAtime);
    }
    if auto_unmount {
        mount_options.push(MountOption::AutoUnmount);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = match (o.allow_other, auto_unmount) {
        (true, _) => SessionACL::All,
        // fusermount3's auto_unmount needs allow_other in the kernel; fuser then lets only
        // root and the owner in, which is the default behaviour without it.
        (false, true) => SessionACL::RootAndOwner,
        (false, false) => SessionACL::Owner,
    };
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    config
}

/// Mounts `remote` at `spec.mountpoint`. It first asks fusermount3 to unmount when this process
/// dies (`auto_unmount`); where that is not allowed (an unprivileged user without
/// `user_allow_other` in /etc/fuse.conf) it mounts without, and says so.
///
/// # Errors
/// [`MountError::Mount`] with the kernel's or fusermount3's reason.
pub fn mount(remote: Arc<Remote>, rt: Handle, spec: &MountSpec) -> Result<Mounted, MountError> {
    let fail = |source| MountError::Mount { path: spec.mountpoint.clone(), source };
    let fs = HomeFs::new(remote.clone(), rt.clone());
    let (session, auto_unmount) = match Session::new(fs, &spec.mountpoint, &config(spec, true)) {
        Ok(s) => (s, true),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(error = %e, "auto_unmount not allowed; if netmount dies, run netmount -u");
            let fs = HomeFs::new(remote.clone(), rt);
            (Session::new(fs, &spec.mountpoint, &config(spec, false)).map_err(fail)?, false)
        }
        Err(e) => return Err(fail(e)),
    };
    // The session exists only now; ops use the notifier from here on.
    let _ = remote.notifier.set(session.notifier());
    raise_read_ahead(&spec.mountpoint);
    Ok(Mounted { session, auto_unmount })
}

/// Sets the mount's read-ahead window to [`READ_AHEAD_KB`] through sysfs
/// (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`). Best effort: only root may write there, and an
/// unprivileged mount keeps the kernel's 128 KiB (slower cold reads, nothing else). The device
/// number comes from /proc/self/mountinfo: a `stat` of the mountpoint would wait for this very
/// daemon, which is not serving yet.
fn raise_read_ahead(mountpoint: &Path) {
    let Some(dev) = mount_device(mountpoint) else {
        tracing::debug!(mountpoint = %mountpoint.display(), "mount not found in mountinfo; read-ahead unchanged");
        return;
    };
    let file = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&file, format!("{READ_AHEAD_KB}\n")) {
        Ok(()) => tracing::debug!(%file, kb = READ_AHEAD_KB, "read-ahead raised"),
        Err(e) => tracing::debug!(%file, error = %e, "read-ahead unchanged (needs root)"),
    }
}

/// The `MAJ:MIN` of the newest mount at `mountpoint`, from /proc/self/mountinfo.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    device_in_mountinfo(&String::from_utf8_lossy(&info), mountpoint)
}

/// Field 3 of the last mountinfo line whose field 5 (octal-escaped) is `mountpoint`.
fn device_in_mountinfo(info: &str, mountpoint: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let want = escape_mountinfo(mountpoint.as_os_str().as_bytes());
    info.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        (f.nth(1)? == want).then(|| dev.to_string())
    })
}

/// The kernel's escaping of a path in mountinfo: space, tab, newline and backslash as `\ooo`.
fn escape_mountinfo(path: &[u8]) -> String {
    let mut out = String::new();
    for &b in path {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(b as char),
        }
    }
    out
}

impl Mounted {
    /// Serves requests until the file system is unmounted (`fusermount3 -u`, `umount`, or
    /// [`super::mountpoint::unmount`] from a signal handler).
    ///
    /// # Errors
    /// The session's final error.
    pub fn run(self) -> io::Result<()> {
        self.session.run()
    }
}

/// Whether `path` is currently mounted (for tests and `-u`).
pub fn is_mounted(path: &Path) -> bool {
    super::mountpoint::is_mount_point(path).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_mount_at_the_path_gives_the_device() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 30 0:55 / /tmp/my\\040mnt rw,nosuid - fuse.homefs a@h rw\n\
                    91 30 0:56 / /tmp/my\\040mnt rw,nosuid - fuse.homefs a@h rw\n\
                    92 30 0:57 / /tmp/my rw - tmpfs t rw\n";
        assert_eq!(device_in_mountinfo(info, Path::new("/tmp/my mnt")).as_deref(), Some("0:56"));
        assert_eq!(device_in_mountinfo(info, Path::new("/tmp/my")).as_deref(), Some("0:57"));
        assert_eq!(device_in_mountinfo(info, Path::new("/tmp/other")), None);
    }
}
