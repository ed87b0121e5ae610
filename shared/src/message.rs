//! The messages: a [`RequestHeader`] or [`ResponseHeader`] encoded with postcard, followed in the
//! same frame by file data as raw bytes (only `Write` requests and `Read` answers carry data).
//!
//! Compatibility rules, because postcard encodes an enum variant as its index:
//! - `Request::Hello` and `Response::Hello` stay variant 0 with the fields they have, forever, so
//!   that any two versions can tell each other their version.
//! - New variants and messages are appended, never inserted; a change to an existing message
//!   bumps [`crate::PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

use crate::{WireError, WirePath};

/// Matches an answer to its request. Chosen by the client, unique among its requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// An open file on the server, valid within one session (one connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fh(pub u64);

/// Proof of an earlier login, to log in again without the password. Opaque to the client.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    /// Tokens are secrets: never printed, never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A request with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHeader {
    pub id: RequestId,
    pub request: Request,
}

/// An answer: the id of the request it answers and either a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHeader {
    pub id: RequestId,
    pub result: Result<Response, WireError>,
}

/// Login outcome codes, after the original FTP design.
pub mod login_code {
    /// Logged in.
    pub const LOGGED_IN: u16 = 201;
    /// Denied: wrong user, wrong password, expired or revoked token. Never says which.
    pub const DENIED: u16 = 401;
}

/// What a client asks. Paths are relative to the user's home (see [`WirePath`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First message on a connection. Answered by `Response::Hello`, or by a `Protocol` error
    /// that names both versions, after which the server closes the connection.
    Hello { version: u32, client: String },
    /// Log in with a password. Answered by `Response::Login` (201 or 401).
    Login { user: String, password: String },
    /// Log in with the token of an earlier login. Answered by `Response::Login` (201 or 401).
    Resume { token: Token },
    /// `lstat`: answered by `Response::Attr`.
    Stat { path: WirePath },
    /// One page of a directory with every entry's attributes, sorted by name (bytewise), starting
    /// after the name `after`. Answered by `Response::Entries`; `.` and `..` are not listed.
    ReadDir { path: WirePath, after: Option<Vec<u8>>, max_entries: u32 },
    /// `mkdir`: answered by `Response::Attr` of the new directory.
    Mkdir { path: WirePath, mode: u32 },
    /// `rmdir`: answered by `Response::Done`.
    Rmdir { path: WirePath },
    /// `unlink` (not for directories): answered by `Response::Done`.
    Unlink { path: WirePath },
    /// `renameat2`: answered by `Response::Done`.
    Rename { from: WirePath, to: WirePath, flags: RenameFlags },
    /// Open (and with `flags.create`, create) a file: answered by `Response::Opened`.
    Open { path: WirePath, flags: OpenFlags, mode: u32 },
    /// Read up to `len` bytes (at most [`crate::MAX_DATA_BYTES`]) at `offset`: answered by
    /// `Response::Data`, with the bytes as the frame's data. Fewer bytes only at end of file.
    Read { fh: Fh, offset: u64, len: u32 },
    /// Write the frame's data at `offset` (ignored for a file opened with `append`): answered by
    /// `Response::Written`. Either all bytes are written or none and an error is returned
    /// (`QuotaExceeded` before any byte is written).
    Write { fh: Fh, offset: u64 },
    /// Close a handle: answered by `Response::Done`. Releases the handle's `flock` lock.
    Close { fh: Fh },
    /// Change attributes; each `Some` field is applied. With `fh`, the open file is used (as
    /// `ftruncate`/`futimens`), else `path`. Answered by `Response::Attr`.
    SetAttr { path: WirePath, fh: Option<Fh>, set: SetAttr },
    /// Create a symlink at `path` pointing to `target` (stored as given): `Response::Attr`.
    Symlink { target: Vec<u8>, path: WirePath },
    /// Read a symlink: answered by `Response::Target`.
    ReadLink { path: WirePath },
    /// Make a hard link `to` to the file at `from` (both in the home): `Response::Attr`.
    Link { from: WirePath, to: WirePath },
    /// `fsync` (or `fdatasync`): answered by `Response::Done` once the data is on disk.
    Fsync { fh: Fh, datasync: bool },
    /// The user's quota as a file system: answered by `Response::StatFs`.
    StatFs,
    /// Server-side `copy_file_range` between two open files: `Response::Copied`. Quota-checked.
    CopyRange { src: Fh, src_offset: u64, dst: Fh, dst_offset: u64, len: u64 },
    /// BLAKE3 of bytes `[start, end)` of the file at `path` (`end` past the end of the file is
    /// cut to its size): answered by `Response::Checksum`.
    Checksum { path: WirePath, start: u64, end: u64 },
    /// Take, change or release a lock on an open file: answered by `Response::Done`, or by
    /// `WouldBlock` when another owner holds a conflicting lock. With `wait`, the server waits
    /// up to a bound (see PROTOCOL.md) before answering `WouldBlock`; the client re-sends.
    Lock { fh: Fh, lock: LockSpec, wait: bool },
    /// Which lock, if any, would conflict with `lock`: answered by `Response::LockTest`.
    TestLock { fh: Fh, lock: LockSpec },
    /// Keeps an idle connection open: answered by `Response::Done`.
    Ping,
    /// As `Write` (the frame's data is written at `offset`), answered by `Response::WrittenAttr`
    /// with the file's attributes after the write, so a client that caches attributes needs no
    /// `Stat` after each write. Appended in protocol 1 (see PROTOCOL.md, "Compound requests").
    WriteAttr { fh: Fh, offset: u64 },
    /// Ask for change notices: answered by `Response::Done`. From then on the server sends, with
    /// the reserved id [`NOTICE_ID`], `Response::Changed` frames naming what other connections of
    /// the same user changed, so that a client may cache metadata for long (PROTOCOL.md, "Change
    /// notices"). Handled by the session itself; a second `Subscribe` changes nothing, and notices
    /// last until the connection ends. Notices are hints: changes made on the server's disk
    /// directly are not announced, so a cache still needs a TTL. Appended in protocol 1.
    Subscribe,
    /// Store a whole small file in one request: the frame's data (at most
    /// [`crate::MAX_DATA_BYTES`]) becomes the content of `path`, written under a temporary name
    /// beside it and renamed into place (an existing file is replaced unless `exclusive`), with
    /// `mode` and, when given, `mtime`. Quota-checked; not synced (see `SyncFs`). Answered by
    /// `Response::Stored`. Appended in protocol 1.
    PutFile { path: WirePath, mode: u32, mtime: Option<Timestamp>, exclusive: bool },
    /// Read a whole file in one request: answered by `Response::FileData`, whose frame data holds
    /// the first `min(size, max_len)` bytes (`max_len` at most [`crate::MAX_DATA_BYTES`]); a client
    /// that gets fewer than `attr.size` bytes reads the rest with `Open`/`Read`. Appended in protocol 1.
    GetFile { path: WirePath, max_len: u32 },
    /// `syncfs` of the file system holding the home: answered by `Response::Done` once everything
    /// written before it is on disk. Appended in protocol 1.
    SyncFs,
    /// Store many small files in one request: each of `files` (at most [`MAX_BATCH_FILES`]) is
    /// stored exactly as a `PutFile` (not exclusive) would store it, its content being the next
    /// `len` bytes of the frame's data (the contents back to back, in order; the lengths must add
    /// up to the data's length). Answered by `Response::StoredFiles` with one result per file, in
    /// order: one refused file (quota, a directory at its name...) does not fail the others.
    /// Not synced (see `Sync`). Appended in protocol 1 (PROTOCOL.md, "Batches").
    PutFiles { files: Vec<PutItem> },
    /// Read many small files in one request: answered by `Response::FilesData` with one result
    /// per path, in order, and the whole contents of the regular files that fit, back to back, as
    /// the frame's data, at most `max_bytes` (and [`crate::MAX_DATA_BYTES`]) in all. At most
    /// [`MAX_BATCH_FILES`] paths. Appended in protocol 1 (PROTOCOL.md, "Batches").
    GetFiles { paths: Vec<WirePath>, max_bytes: u32 },
    /// Make what is at `paths` durable (at most [`MAX_SYNC_PATHS`]): each file's data and
    /// attributes, each directory, and each path's entry in its parent directory (symlinks are not
    /// followed: their entry is made durable). Answered by `Response::Done` once all of it is on
    /// disk; the server may do it with one `syncfs` when that is cheaper. Appended in protocol 1
    /// (PROTOCOL.md, "Batches").
    Sync { paths: Vec<WirePath> },
    /// Remove many names in one request: each item, in order, exactly as `Unlink`
    /// ([`RemoveKind::File`]) or `Rmdir` ([`RemoveKind::Dir`]) of its path (at most
    /// [`MAX_BATCH_FILES`] items). Answered by `Response::Removed` with one result per item, in
    /// order: a failed item does not stop the ones after it (an `Rmdir` after a failed `Unlink` of
    /// one of its files then fails on its own, `NotEmpty`). Appended in protocol 1 (PROTOCOL.md,
    /// "Batched removes"); an older server cannot decode it and closes the connection.
    Remove { items: Vec<RemoveItem> },
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The server's protocol version and name.
    Hello { version: u32, server: String },
    /// The outcome of `Login` or `Resume`: [`login_code::LOGGED_IN`] with a fresh token (each
    /// login renews it), or [`login_code::DENIED`].
    Login { code: u16, token: Option<Token>, message: String },
    /// Attributes of one file.
    Attr(Attr),
    /// A directory page; `more` is true when entries after the last one remain.
    Entries { entries: Vec<DirEntry>, more: bool },
    /// An open file and its attributes after opening (after truncation, for `truncate`).
    Opened { fh: Fh, attr: Attr },
    /// The frame's data holds the bytes read; `size` is the file's size after the read.
    Data { size: u64 },
    /// Bytes written, and the file's size after the write.
    Written { len: u32, size: u64 },
    /// Success with nothing to report.
    Done,
    /// A symlink's target.
    Target(Vec<u8>),
    /// The quota as a file system.
    StatFs(StatFs),
    /// Bytes copied by `CopyRange`.
    Copied { len: u64 },
    /// The BLAKE3 of the range; `len` is how many bytes it covers, `size` and `mtime` describe the
    /// file when it was read, so a client can tell that a file changed.
    Checksum { hash: [u8; 32], len: u64, size: u64, mtime: Timestamp },
    /// The conflicting lock, if any.
    LockTest(Option<LockSpec>),
    /// Answers `WriteAttr`: bytes written, and the file's attributes after the write.
    WrittenAttr { len: u32, attr: Attr },
    /// A change notice, sent unasked with id [`NOTICE_ID`] after `Subscribe`: each path's entry
    /// or content was changed by another connection of the same user (for a rename, both names;
    /// for writes, the path the handle was opened with, once per burst and at Fsync/Close).
    /// Coalesced: paths changed within a few milliseconds share a frame (at most 256, in no
    /// order, each once). `all` (with no paths) means notices were lost (the subscriber fell
    /// behind): drop every cached entry.
    Changed { paths: Vec<WirePath>, all: bool },
    /// Answers `PutFile`: the BLAKE3 of the bytes stored and the file's attributes after the rename.
    Stored { hash: [u8; 32], attr: Attr },
    /// Answers `GetFile`: the file's attributes when it was read and the BLAKE3 of the bytes sent
    /// (the frame's data).
    FileData { attr: Attr, hash: [u8; 32] },
    /// Answers `PutFiles`: each file's outcome, in the order of the request.
    StoredFiles { results: Vec<Result<StoredItem, WireError>> },
    /// Answers `GetFiles`: each path's outcome, in the order of the request; the frame's data is
    /// the bytes of every `Ok` item (`len` each), back to back in that order.
    FilesData { results: Vec<Result<FileItem, WireError>> },
    /// Answers `Remove`: each item's outcome, in the order of the request.
    Removed { results: Vec<Result<(), WireError>> },
}

/// One name of a `Remove` batch, and how it is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveItem {
    pub path: WirePath,
    pub kind: RemoveKind,
}

/// How a `Remove` item goes: as `Unlink` (anything but a directory) or as `Rmdir` (an empty
/// directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RemoveKind {
    File,
    Dir,
}

/// The most files in one `PutFiles` or `GetFiles`: bounds the server's work per request and the
/// size of an answer's header (each result is at most a few hundred bytes).
pub const MAX_BATCH_FILES: usize = 1024;

/// The most paths in one `Sync`: enough for a tree of thousands of files in one request, so that
/// the server weighs one `syncfs` against an fsync per path for the whole run at once (the paths
/// must also fit in a header, `MAX_HEADER_BYTES`).
pub const MAX_SYNC_PATHS: usize = 16384;

/// One file of a `PutFiles` batch: where, with what mode (and, when given, mtime), and how many
/// bytes of the frame's data are its content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutItem {
    pub path: WirePath,
    pub mode: u32,
    pub mtime: Option<Timestamp>,
    pub len: u32,
}

/// One stored file of a `PutFiles` answer: as `Response::Stored`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredItem {
    /// BLAKE3 of the bytes stored.
    pub hash: [u8; 32],
    /// The file's attributes after the rename.
    pub attr: Attr,
}

/// One file of a `GetFiles` answer: its attributes when it was read, and `len` bytes of the
/// frame's data with their BLAKE3. A regular file has `len == attr.size` unless it did not fit in
/// what was left of `max_bytes` (then `len` is 0: read it on its own) or it shrank while it was
/// read; other kinds have `len` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileItem {
    pub attr: Attr,
    pub hash: [u8; 32],
    pub len: u32,
}

/// The id of every unasked `Response::Changed` frame. Clients number their requests from 1, so
/// no request ever has it; a request sent with id 0 is refused with a `Protocol` error.
pub const NOTICE_ID: RequestId = RequestId(0);

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// The type of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// What `lstat` says of a file. Owner and group are not sent: every file in a home belongs to
/// its user, and the mount shows them as the user who mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attr {
    /// The server's inode number; stable while the file exists.
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub perm: u32,
    pub nlink: u32,
    /// Apparent size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

/// A directory entry with its attributes (readdirplus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// `renameat2` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RenameFlags {
    /// `RENAME_NOREPLACE`: fail with `Exists` if `to` exists.
    pub noreplace: bool,
    /// `RENAME_EXCHANGE`: swap `from` and `to`, which must both exist.
    pub exchange: bool,
}

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OpenFlags {
    pub read: bool,
    pub write: bool,
    /// Every write goes to the end of the file.
    pub append: bool,
    /// Create the file (with `mode`) if it does not exist.
    pub create: bool,
    /// With `create`: fail with `Exists` if it exists.
    pub exclusive: bool,
    /// Truncate to zero length (quota is freed at once).
    pub truncate: bool,
}

/// A time to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    /// The server's clock.
    Now,
    At(Timestamp),
}

/// Attributes to change; `None` leaves one as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Truncate or extend (quota-checked).
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// The quota, shown as a file system (`df`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    /// The user's quota in bytes: the size of the file system.
    pub total_bytes: u64,
    /// Bytes in use by the user's files (sum of apparent sizes).
    pub used_bytes: u64,
    /// Bytes the user may still write: the quota left, or the disk's free space if smaller.
    pub free_bytes: u64,
    /// Preferred I/O size.
    pub block_size: u32,
    /// The longest name.
    pub max_name: u32,
}

/// The kind of a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    /// Shared (`F_RDLCK`, `LOCK_SH`).
    Read,
    /// Exclusive (`F_WRLCK`, `LOCK_EX`).
    Write,
    /// Release (`F_UNLCK`, `LOCK_UN`).
    Unlock,
}

/// A byte-range (`fcntl`) or whole-file (`flock`) lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockSpec {
    pub kind: LockKind,
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive (`u64::MAX`: to the end of the file, however far it grows).
    pub end: u64,
    /// The client's lock owner. Locks of one owner in one session never conflict with each other.
    pub owner: u64,
    /// The client's process id, reported back by `TestLock`.
    pub pid: u32,
    /// A `flock` lock (whole file, tied to the open file) rather than an `fcntl` one.
    pub flock: bool,
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn attr() -> Attr {
        let t = Timestamp::default();
        Attr { ino: 1, kind: FileKind::File, perm: 0o644, nlink: 1, size: 3, blocks: 8, atime: t, mtime: t, ctime: t }
    }

    /// The batch messages' variant indices (PROTOCOL.md's tables) and their round trips.
    #[test]
    fn batch_variants_encode_at_their_indices() {
        let p = || WirePath::new("d/x").expect("valid");
        let item = PutItem { path: p(), mode: 0o600, mtime: Some(Timestamp { secs: 5, nanos: 6 }), len: 3 };
        let requests = [
            (29, Request::PutFiles { files: vec![item.clone(), item] }),
            (30, Request::GetFiles { paths: vec![p(), p()], max_bytes: 1 << 20 }),
            (31, Request::Sync { paths: vec![p()] }),
            (
                32,
                Request::Remove {
                    items: vec![
                        RemoveItem { path: p(), kind: RemoveKind::File },
                        RemoveItem { path: WirePath::new("d").expect("valid"), kind: RemoveKind::Dir },
                    ],
                },
            ),
        ];
        for (index, request) in requests {
            let header = RequestHeader { id: RequestId(1), request };
            let enc = postcard::to_stdvec(&header).expect("encodes");
            assert_eq!(enc[1], index, "{header:?}");
            assert_eq!(postcard::from_bytes::<RequestHeader>(&enc).expect("decodes"), header);
        }
        let refused = WireError::new(crate::ErrorCode::QuotaExceeded, "quota");
        let responses = [
            (17, Response::StoredFiles { results: vec![Ok(StoredItem { hash: [7; 32], attr: attr() }), Err(refused)] }),
            (18, Response::FilesData { results: vec![Ok(FileItem { attr: attr(), hash: [1; 32], len: 3 })] }),
            (
                19,
                Response::Removed {
                    results: vec![Ok(()), Err(WireError::new(crate::ErrorCode::NotEmpty, "not empty"))],
                },
            ),
        ];
        for (index, response) in responses {
            let header = ResponseHeader { id: RequestId(1), result: Ok(response) };
            let enc = postcard::to_stdvec(&header).expect("encodes");
            assert_eq!(enc[2], index, "{header:?}");
            assert_eq!(postcard::from_bytes::<ResponseHeader>(&enc).expect("decodes"), header);
        }
    }
}
