//! The connection both binaries share: TLS, handshake, login, and a multiplexed request stream
//! that survives a lost connection (it logs in again with the session token).
//!
//! OWNED BY: the client work (client/). netmount (fuse/) and netcp (copy/) use only the public
//! API declared here; its signatures are the contract between the three.
//!
//! Handles ([`Fh`]) returned by [`Client::open`] are the client's own: they stay valid across a
//! reconnect (the file is reopened by path on the new connection, and a rename through this
//! client updates the path of its open handles).

use bytes::Bytes;
use homefs_shared::{
    Attr, DirEntry, Fh, LockSpec, OpenFlags, RenameFlags, Request, Response, SetAttr, StatFs, Timestamp, WireError,
    WirePath,
};
use std::path::PathBuf;
use std::time::Duration;

pub mod login_args;

/// Where the server is: `[USER@]HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

/// How the server's certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// `--fingerprint SHA256:...`
    Fingerprint(String),
    /// `--ca FILE`
    Ca(PathBuf),
    /// known_hosts (XDG config dir); `accept_new` pins an unknown host without asking.
    KnownHosts { file: PathBuf, accept_new: bool },
}

/// Asks for the password, after the server's certificate is trusted (as ssh asks after the host
/// key). Called again never: reconnects use the session token.
pub type PasswordFn = Box<dyn FnOnce() -> anyhow::Result<String> + Send>;

/// Everything needed to connect and log in.
pub struct ConnectOptions {
    pub server: ServerAddr,
    pub user: String,
    pub trust: Trust,
    /// Whether the client may ask on the terminal (an unknown certificate); when false, an
    /// unknown certificate without `accept_new` is an error.
    pub interactive: bool,
    /// How long a call waits for the connection to come back before it fails with EIO (30 s).
    pub reconnect_timeout: Duration,
    /// The most requests in flight at once (bounded, for memory and fairness).
    pub max_in_flight: usize,
    /// Sent in Hello, for the server's log (e.g. "netmount 0.1.0").
    pub client_name: String,
}

/// Why connecting failed; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable { addr: String, source: std::io::Error },
    #[error("login denied (401)")]
    Denied,
    #[error("unknown server certificate {fingerprint}; no terminal to ask (use --accept-new or --fingerprint)")]
    UnknownHost { fingerprint: String },
    #[error("server certificate CHANGED for {host}: expected {expected}, got {got}; refusing to connect (if this is expected, remove the line from {known_hosts})")]
    HostKeyChanged { host: String, expected: String, got: String, known_hosts: String },
    #[error("certificate not accepted")]
    NotAccepted,
    #[error("protocol version mismatch: {0}")]
    Version(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

/// A logged-in connection. Cheap to clone; all clones share one TLS connection.
#[derive(Clone)]
pub struct Client {
    _private: (),
}

#[allow(unused_variables)]
impl Client {
    /// Connects, checks the certificate, says Hello, and logs in.
    ///
    /// # Errors
    /// [`ConnectError`], one variant per reason the user must act on.
    pub async fn connect(opts: ConnectOptions, password: PasswordFn) -> Result<Client, ConnectError> {
        todo!("client")
    }

    /// The logged-in user.
    pub fn user(&self) -> &str {
        todo!("client")
    }

    /// The server's certificate fingerprint.
    pub fn fingerprint(&self) -> &str {
        todo!("client")
    }

    /// Sends any request and waits for its answer (bounded by the reconnect timeout).
    ///
    /// # Errors
    /// The server's error, or `Io`/`TimedOut` when the connection could not be restored in time.
    pub async fn call(&self, request: Request, data: Bytes) -> Result<(Response, Bytes), WireError> {
        todo!("client")
    }

    pub async fn stat(&self, path: &WirePath) -> Result<Attr, WireError> {
        todo!("client")
    }
    /// One page of a directory (see `Request::ReadDir`); returns the entries and whether more remain.
    pub async fn read_dir_page(
        &self,
        path: &WirePath,
        after: Option<Vec<u8>>,
        max_entries: u32,
    ) -> Result<(Vec<DirEntry>, bool), WireError> {
        todo!("client")
    }
    /// A whole directory, all pages.
    pub async fn read_dir(&self, path: &WirePath) -> Result<Vec<DirEntry>, WireError> {
        todo!("client")
    }
    pub async fn mkdir(&self, path: &WirePath, mode: u32) -> Result<Attr, WireError> {
        todo!("client")
    }
    pub async fn rmdir(&self, path: &WirePath) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn unlink(&self, path: &WirePath) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn rename(&self, from: &WirePath, to: &WirePath, flags: RenameFlags) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn open(&self, path: &WirePath, flags: OpenFlags, mode: u32) -> Result<(Fh, Attr), WireError> {
        todo!("client")
    }
    /// Up to `len` bytes at `offset`; fewer only at end of file. Also returns the file's size.
    pub async fn read(&self, fh: Fh, offset: u64, len: u32) -> Result<(Bytes, u64), WireError> {
        todo!("client")
    }
    /// Writes all of `data` at `offset`; returns the file's size after the write.
    pub async fn write(&self, fh: Fh, offset: u64, data: Bytes) -> Result<u64, WireError> {
        todo!("client")
    }
    pub async fn close(&self, fh: Fh) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn setattr(&self, path: &WirePath, fh: Option<Fh>, set: SetAttr) -> Result<Attr, WireError> {
        todo!("client")
    }
    pub async fn symlink(&self, target: &[u8], path: &WirePath) -> Result<Attr, WireError> {
        todo!("client")
    }
    pub async fn readlink(&self, path: &WirePath) -> Result<Vec<u8>, WireError> {
        todo!("client")
    }
    pub async fn link(&self, from: &WirePath, to: &WirePath) -> Result<Attr, WireError> {
        todo!("client")
    }
    pub async fn fsync(&self, fh: Fh, datasync: bool) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn statfs(&self) -> Result<StatFs, WireError> {
        todo!("client")
    }
    pub async fn copy_range(
        &self,
        src: Fh,
        src_offset: u64,
        dst: Fh,
        dst_offset: u64,
        len: u64,
    ) -> Result<u64, WireError> {
        todo!("client")
    }
    /// BLAKE3 of `[start, end)`: (hash, bytes covered, file size, mtime).
    pub async fn checksum(
        &self,
        path: &WirePath,
        start: u64,
        end: u64,
    ) -> Result<([u8; 32], u64, u64, Timestamp), WireError> {
        todo!("client")
    }
    /// One lock request (the caller re-sends on `WouldBlock` when it wants to keep waiting).
    pub async fn lock(&self, fh: Fh, lock: LockSpec, wait: bool) -> Result<(), WireError> {
        todo!("client")
    }
    pub async fn test_lock(&self, fh: Fh, lock: LockSpec) -> Result<Option<LockSpec>, WireError> {
        todo!("client")
    }
}
