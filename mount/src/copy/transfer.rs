//! One file, put or get: a small file in one request (`PutFile`/`GetFile`), a larger one in
//! pipelined 256 KiB requests through the one connection; BLAKE3 over the whole file on both ends,
//! written under a temporary name and renamed into place only once it verifies.
//!
//! Durability: no file is synced on its own. The caller syncs once at the end of a run (for puts
//! `Sync` of what the run wrote, see [`super::batch::sync`], or [`sync_remote`] with an older
//! server; [`sync_local`] for gets) and reports success only after that; resume does not rely
//! on syncs, as it verifies the partial file's hash before continuing it. A streamed get of 16 MiB
//! or more is written around the page cache (O_DIRECT, [`super::writeback::Direct`]); otherwise
//! (or where O_DIRECT is refused) the writeback of what landed is started every 16 MiB
//! ([`super::writeback`]); either way the final sync only waits for the tail.
//!
//! A get: the client hashes the bytes as they stream (continuing the hash of a verified prefix when
//! it resumes, see [`super::resume`]) and compares with the server's whole-file checksum. A put:
//! the client hashes each 32 MiB segment as it reads it and the server checksums that range of what
//! it stored as soon as the segment's writes are answered, while the rest streams (after a verified
//! prefix when it resumes), so no whole-file pass is left after the last byte.
//! A mismatch (or a source that changed meanwhile) is retried once from scratch, then reported.
//! A failed transfer leaves its partial file for the next run to continue.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use homefs_shared::{sync_cost, ErrorCode, FileKind, OpenFlags, RenameFlags, SetAttr, SetTime, Timestamp, WirePath};
use tokio::sync::mpsc;

use super::progress::{FileProgress, Outcome};
use super::resume::{self, Prefix, SourceId};
use super::CopyError;
use crate::client::Client;

/// Bytes per read or write request of a streamed file. Not the protocol's largest (4 MiB): each
/// chunk is copied (into or out of the page cache) and hashed on both ends after it was decrypted
/// or before it is encrypted, and a 256 KiB chunk is still in the CPU's cache then, where a 4 MiB
/// one is not. Measured on a 1 GiB file (2-core VM, loopback): 4 MiB x 8 in flight took 2.2-2.4 s
/// of client system time for a get, 256 KiB x 16 took 0.7-0.9 s; puts: fsd CPU 1.9-3.1 s -> 1.1-1.8 s.
pub const CHUNK_BYTES: u32 = 256 << 10;

/// Requests of one file in flight at once: 16 x 256 KiB = 4 MiB keeps the connection busy while
/// the other side writes or reads the previous chunks (a round trip on loopback is far shorter),
/// bounds the memory of one transfer, and stays within the CPU's cache (see [`CHUNK_BYTES`]).
pub const IN_FLIGHT: usize = 16;

/// Files up to this size go in one request each way (`PutFile`/`GetFile`); larger ones are
/// streamed (and resumable). At most `MAX_DATA_BYTES`, so that the request fits in one frame.
pub const SMALL_FILE_BYTES: u32 = 1 << 20;
const _: () = assert!(SMALL_FILE_BYTES <= homefs_shared::MAX_DATA_BYTES);

/// A put is verified segment by segment: once all writes of a segment of this many bytes are
/// answered, the server's checksum of that range is compared with the client's hash of it, while
/// the next segments stream. Only the last segment's check is left after the last write (a whole-
/// file checksum re-read 1 GiB alone at the end: ~0.3 s on this VM); 32 checks for 1 GiB.
pub const SEGMENT_BYTES: u64 = 32 << 20;

/// Segment checks in flight at once (each a server-side re-read of one segment, ~15-30 ms for
/// 32 MiB here, while a segment takes ~50 ms to send): enough that a check slowed by load does not
/// stall the writes, and checks that lag further stop the sending, so they cannot pile up.
const MAX_CHECKS: usize = 4;

/// Chunks queued between the local reader/writer thread and the network side: as many as are in
/// flight, so neither side waits on the other while both are busy.
const LOCAL_QUEUE: usize = IN_FLIGHT;

/// How to copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransferOptions {
    /// `-p`: keep mode and modification time.
    pub preserve: bool,
    /// Continue a partial copy (off with `--no-resume`).
    pub resume: bool,
    /// The caller already removed stale partial files of this file (a tree lists each directory
    /// once for all its files, rather than once per file).
    pub swept: bool,
}

/// A local modification time on the wire.
pub fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            let secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => Timestamp { secs, nanos: 0 },
                n => Timestamp { secs: secs - 1, nanos: 1_000_000_000 - n },
            }
        }
    }
}

/// A wire time as a local one.
pub fn system_time(t: Timestamp) -> SystemTime {
    let nanos = std::time::Duration::from_nanos(u64::from(t.nanos));
    match u64::try_from(t.secs) {
        Ok(secs) => UNIX_EPOCH + std::time::Duration::from_secs(secs) + nanos,
        Err(_) => UNIX_EPOCH - std::time::Duration::from_secs(t.secs.unsigned_abs()) + nanos,
    }
}

fn join_error(e: tokio::task::JoinError) -> CopyError {
    CopyError::Local(io::Error::other(e))
}

/// Whether a failure looks like the connection dropping (or the server restarting) under the
/// transfer: writes in flight then fail with `Io` (the client does not resend them, as the server
/// may have applied them) and handles may be stale. Such a transfer is continued once, in the same
/// run, exactly as the next run would: the client reconnects with its token (waiting up to its
/// reconnect timeout), and what arrived is verified on both sides before the rest is sent.
fn is_connection_loss(e: &CopyError) -> bool {
    matches!(
        e,
        CopyError::Remote(w) if matches!(
            w.code,
            ErrorCode::Io | ErrorCode::NotConnected | ErrorCode::TimedOut | ErrorCode::Stale | ErrorCode::BadHandle
        )
    )
}

/// Copies the local file `local` to the remote path `remote` (the file's final name).
///
/// # Errors
/// [`CopyError`]: the server's or the local error, [`CopyError::Quota`] before anything is sent,
/// [`CopyError::Verify`] when the hashes differ twice.
pub async fn put(
    client: &Client,
    local: &Path,
    remote: &WirePath,
    opts: TransferOptions,
    bar: &FileProgress,
) -> Result<Outcome, CopyError> {
    with_retries("put", remote, opts, bar, |o| put_once(client, local, remote, o, bar)).await
}

/// The retry policy of one file, the same both ways: a lost connection continues once after the
/// reconnect (resuming what arrived); a file that did not verify, or whose source changed, is
/// copied once more from scratch.
async fn with_retries<F, Fut>(
    op: &str,
    remote: &WirePath,
    opts: TransferOptions,
    bar: &FileProgress,
    once: F,
) -> Result<Outcome, CopyError>
where
    F: Fn(TransferOptions) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, CopyError>>,
{
    let mut result = once(opts).await;
    if opts.resume && result.as_ref().is_err_and(is_connection_loss) {
        tracing::warn!(path = %remote, op, "connection lost; continuing after the reconnect");
        result = once(opts).await;
    }
    match result {
        Err(CopyError::Verify | CopyError::SourceChanged) => {
            tracing::warn!(path = %remote, op, "did not verify; retrying from scratch");
            bar.set_position(0);
            once(TransferOptions { resume: false, ..opts }).await
        }
        other => other,
    }
}

async fn put_once(
    client: &Client,
    local: &Path,
    remote: &WirePath,
    opts: TransferOptions,
    bar: &FileProgress,
) -> Result<Outcome, CopyError> {
    let started = Instant::now();
    // One hop to the blocking pool: the file's metadata and, for a small file, its bytes.
    let path = local.to_path_buf();
    let (meta, small) = tokio::task::spawn_blocking(move || read_source(&path)).await.map_err(join_error)??;
    if meta.is_dir() {
        return Err(CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir)));
    }
    if !meta.is_file() {
        return Err(CopyError::Unsupported("not a regular file".into()));
    }
    let id = SourceId { size: meta.len(), mtime: timestamp(meta.modified()?) };
    let Some((parent, name)) = remote.split_last() else {
        return Err(CopyError::Unsupported("the destination is the home itself".into()));
    };
    if let Some(data) = small {
        return put_small(client, remote, &meta, id, data, opts, bar, started).await;
    }
    let part = parent.join(&resume::part_name(name, &id))?;

    let prefix = if opts.resume {
        if !opts.swept {
            remove_stale_remote(client, &parent, name, &id).await;
        }
        resume::check_put(client, &part, local, &id).await?
    } else {
        Prefix::Fresh
    };
    // The verified prefix's hasher is not needed: what follows is checked segment by segment.
    let (start, reclaimed) = match prefix {
        Prefix::Good { len, .. } => (len, 0),
        Prefix::Corrupt { len } => {
            tracing::warn!(path = %part, len, "partial file does not match the source; starting from zero");
            (0, len)
        }
        Prefix::Fresh => (0, 0),
    };

    // Quota: refuse before sending anything. A corrupted partial file we are about to truncate
    // gives its space back. With nothing to reclaim, the free space is asked for together with
    // the open (one round trip less a file); a refused put then removes the empty file it made.
    let needs = id.size - start;
    let flags = OpenFlags { write: true, create: true, truncate: start == 0, ..OpenFlags::default() };
    let fh = if reclaimed == 0 && start == 0 {
        let (statfs, opened) = futures::join!(client.statfs(), client.open(&part, flags, 0o600));
        let (fh, _) = opened?;
        let free = match statfs {
            Ok(s) => s.free_bytes,
            Err(e) => {
                let _ = client.close(fh).await;
                return Err(e.into());
            }
        };
        if needs > free {
            let _ = client.close(fh).await;
            let _ = client.unlink(&part).await;
            return Err(CopyError::Quota { needs, free });
        }
        fh
    } else {
        let free = client.statfs().await?.free_bytes.saturating_add(reclaimed);
        if needs > free {
            return Err(CopyError::Quota { needs, free });
        }
        client.open(&part, flags, 0o600).await?.0
    };
    if start > 0 {
        // Drop what lies past the verified prefix (holes left by writes that were in flight).
        let cut = SetAttr { size: Some(start), ..SetAttr::default() };
        if let Err(e) = client.setattr(&part, Some(fh), cut).await {
            let _ = client.close(fh).await;
            return Err(e.into());
        }
    }
    bar.set_position(start);
    // The server verifies each segment as soon as all its writes are answered (see
    // [`SEGMENT_BYTES`]), so only the last segment's checksum is left after the last write. Then the
    // final mode and mtime; then close and rename at once, the rename only after every segment
    // matched. No fsync: the run ends with one `SyncFs` (see the module doc).
    let streaming = Instant::now();
    let streamed = stream_up(client, fh, &part, local, start, id.size, bar).await;
    tracing::debug!(path = %remote, elapsed = ?streaming.elapsed(), "put: every segment verified");
    let set = SetAttr {
        mode: Some(meta.permissions().mode() & if opts.preserve { 0o7777 } else { 0o777 }),
        mtime: opts.preserve.then_some(SetTime::At(id.mtime)),
        ..SetAttr::default()
    };
    let verified = match streamed {
        Ok(total) if total != id.size => Err(CopyError::SourceChanged),
        Ok(total) => client.setattr(&part, Some(fh), set).await.map(|_| total).map_err(CopyError::from),
        Err(e) => Err(e),
    };
    let total = match verified {
        Ok(total) => total,
        Err(e) => {
            let _ = client.close(fh).await;
            return Err(e);
        }
    };
    let (closed, renamed) = futures::join!(client.close(fh), client.rename(&part, remote, RenameFlags::default()));
    tracing::debug!(path = %remote, elapsed = ?streaming.elapsed(), "put: closed and renamed");
    renamed?;
    closed?;
    Ok(Outcome {
        bytes: total,
        resumed_at: (start > 0).then_some(start),
        sent: total - start,
        elapsed: started.elapsed(),
    })
}

/// Removes partial files of `name` left by another version of the source (best effort: a failure
/// only leaves a stale file behind).
async fn remove_stale_remote(client: &Client, parent: &WirePath, name: &[u8], id: &SourceId) {
    let Ok(entries) = client.read_dir(parent).await else { return };
    for e in entries.iter().filter(|e| e.attr.kind == FileKind::File && resume::is_stale_part(&e.name, name, id)) {
        if let Ok(p) = parent.join(&e.name) {
            let _ = client.unlink(&p).await;
        }
    }
}

/// What the local reader hands to the network side: the next chunk, or the end of a segment
/// (everything sent since the previous end) with the BLAKE3 of its bytes.
enum Piece {
    Chunk(Bytes),
    SegmentEnd([u8; 32]),
}

/// A segment whose bytes are all sent, waiting for its writes to be answered before the server is
/// asked for its checksum.
struct SentSegment {
    start: u64,
    end: u64,
    hash: [u8; 32],
    /// Writes of this segment not answered yet.
    pending: usize,
}

/// Reads the local file from `start` on a blocking thread (hashing each segment there) and writes
/// it with up to [`IN_FLIGHT`] requests at once (`expected`: the length it had, for sizing
/// buffers). Each segment is checked against the server's checksum of that range of `part` as soon
/// as all its writes are answered, while later segments are still being sent. Returns the file's
/// length as read, once every segment matched.
async fn stream_up(
    client: &Client,
    fh: homefs_shared::Fh,
    part: &WirePath,
    local: &Path,
    start: u64,
    expected: u64,
    bar: &FileProgress,
) -> Result<u64, CopyError> {
    let (tx, mut rx) = mpsc::channel::<Piece>(LOCAL_QUEUE);
    let path = local.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> io::Result<u64> {
        let mut file = File::open(&path)?;
        file.seek(SeekFrom::Start(start))?;
        let mut total = start;
        let mut hasher = blake3::Hasher::new();
        let mut in_segment = 0u64;
        loop {
            // As large as what should be left (a small file does not take a whole chunk), but
            // not tiny: a file that grew is read on (it then fails as changed).
            let left = expected.saturating_sub(total).clamp(64 << 10, u64::from(CHUNK_BYTES));
            // `read_to_end` into spare capacity reads into uninitialised memory (no memset of
            // each chunk: 3% of the client's CPU in a 1 GiB put) and retries on EINTR.
            let mut buf = Vec::with_capacity(usize::try_from(left).unwrap_or(CHUNK_BYTES as usize));
            (&mut file).take(left).read_to_end(&mut buf)?;
            let filled = buf.len();
            let mut pieces = Vec::with_capacity(2);
            if filled > 0 {
                hasher.update(&buf);
                total += filled as u64;
                in_segment += filled as u64;
                pieces.push(Piece::Chunk(Bytes::from(buf)));
            }
            let end = filled == 0;
            if in_segment > 0 && (end || in_segment >= SEGMENT_BYTES) {
                pieces.push(Piece::SegmentEnd(*hasher.finalize().as_bytes()));
                hasher.reset();
                in_segment = 0;
            }
            for p in pieces {
                if tx.blocking_send(p).is_err() {
                    // The network side stopped (an error): it reports why.
                    return Ok(total);
                }
            }
            if end {
                return Ok(total);
            }
        }
    });

    let mut in_flight = FuturesUnordered::new();
    let mut checks = FuturesUnordered::new();
    // Segments sent but not yet asked for, oldest first; `first_id` numbers the front one.
    let mut sent = std::collections::VecDeque::<SentSegment>::new();
    let mut first_id = 0u64;
    let (mut seg_start, mut seg_pending) = (start, 0usize);
    let mut offset = start;
    let mut eof = false;
    let mut checked_size = None;
    let result: Result<(), CopyError> = loop {
        while !eof && in_flight.len() < IN_FLIGHT && checks.len() < MAX_CHECKS {
            match rx.recv().await {
                Some(Piece::Chunk(chunk)) => {
                    let len = chunk.len() as u64;
                    super::rate::pace(chunk.len()).await;
                    let c = client.clone();
                    let (at, seg) = (offset, first_id + sent.len() as u64);
                    in_flight.push(async move { c.write(fh, at, chunk).await.map(|_| (len, seg)) });
                    offset += len;
                    seg_pending += 1;
                }
                Some(Piece::SegmentEnd(hash)) => {
                    sent.push_back(SentSegment { start: seg_start, end: offset, hash, pending: seg_pending });
                    (seg_start, seg_pending) = (offset, 0);
                }
                None => eof = true,
            }
        }
        while sent.front().is_some_and(|s| s.pending == 0) {
            let Some(s) = sent.pop_front() else { break };
            first_id += 1;
            let c = client.clone();
            let part = part.clone();
            checks.push(async move { (c.checksum(&part, s.start, s.end).await, s) });
        }
        if in_flight.is_empty() && checks.is_empty() {
            if eof {
                // Every write answered, so every segment was asked for and answered.
                break Ok(());
            }
            // (Not reached: the filling above stops only at the end or with requests in flight.)
            continue;
        }
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => match done {
                Ok((n, seg)) => {
                    bar.inc(n);
                    if eof && in_flight.is_empty() {
                        tracing::debug!(path = %part, elapsed = ?bar.started().elapsed(), "put: last write answered");
                    }
                    match seg.checked_sub(first_id).and_then(|i| sent.get_mut(usize::try_from(i).ok()?)) {
                        Some(s) => s.pending -= 1,
                        // The segment still being read.
                        None => seg_pending -= 1,
                    }
                }
                Err(e) => break Err(e.into()),
            },
            Some((summed, s)) = checks.next(), if !checks.is_empty() => match summed {
                Ok((hash, covered, size, _)) => {
                    if covered != s.end - s.start || hash != s.hash {
                        break Err(CopyError::Verify);
                    }
                    // Checks may finish out of order; the file only grows during a put.
                    checked_size = checked_size.max(Some(size));
                }
                Err(e) => break Err(e.into()),
            },
            else => continue,
        }
    };
    drop(rx);
    let read = reader.await.map_err(join_error)?;
    result?;
    let total = read?;
    // The server's file holds exactly what was sent: its size at the last check (or now, when
    // nothing was sent because the verified prefix is the whole file).
    let size = match checked_size {
        Some(size) => size,
        None => client.checksum(part, 0, 0).await?.2,
    };
    if total != offset || size != total {
        return Err(if total != expected { CopyError::SourceChanged } else { CopyError::Verify });
    }
    Ok(total)
}

/// Copies the remote file `remote` to the local path `local` (the file's final name).
///
/// # Errors
/// As [`put`].
pub async fn get(
    client: &Client,
    remote: &WirePath,
    local: &Path,
    opts: TransferOptions,
    bar: &FileProgress,
) -> Result<Outcome, CopyError> {
    get_sized(client, remote, local, opts, bar, None).await
}

/// As [`get`], knowing the remote file's size from a listing (`None`: not known): a file known
/// to be larger than [`SMALL_FILE_BYTES`] is not asked for in one request first.
///
/// # Errors
/// As [`put`].
pub async fn get_sized(
    client: &Client,
    remote: &WirePath,
    local: &Path,
    opts: TransferOptions,
    bar: &FileProgress,
    size: Option<u64>,
) -> Result<Outcome, CopyError> {
    let small = size.is_none_or(|s| s <= u64::from(SMALL_FILE_BYTES));
    with_retries("get", remote, opts, bar, |o| async move {
        if small {
            if let Some(outcome) = get_small(client, remote, local, o, bar).await? {
                return Ok(outcome);
            }
        }
        get_once(client, remote, local, o, bar).await
    })
    .await
}

/// The local partial file for `local` and the source version `id`.
pub(super) fn local_part(local: &Path, id: &SourceId) -> Result<(PathBuf, Vec<u8>), CopyError> {
    let name = local
        .file_name()
        .ok_or_else(|| CopyError::Unsupported("the destination has no file name".into()))?
        .as_bytes()
        .to_vec();
    let parent = match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent.join(super::remote::local_name(&resume::part_name(&name, id))), name))
}

async fn get_once(
    client: &Client,
    remote: &WirePath,
    local: &Path,
    opts: TransferOptions,
    bar: &FileProgress,
) -> Result<Outcome, CopyError> {
    let started = Instant::now();
    // Opening goes through the server's jail: a symlink that leads out of the home is refused or
    // resolved inside it there; this client never names a path outside the home.
    let (fh, attr) = client.open(remote, OpenFlags { read: true, ..OpenFlags::default() }, 0).await?;
    let result = get_open(client, fh, attr, remote, local, opts, bar, started).await;
    let closed = client.close(fh).await;
    let outcome = result?;
    if let Err(e) = closed {
        tracing::debug!(error = %e, "close after get");
    }
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
async fn get_open(
    client: &Client,
    fh: homefs_shared::Fh,
    attr: homefs_shared::Attr,
    remote: &WirePath,
    local: &Path,
    opts: TransferOptions,
    bar: &FileProgress,
    started: Instant,
) -> Result<Outcome, CopyError> {
    if attr.kind != FileKind::File {
        return Err(match attr.kind {
            FileKind::Dir => CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir)),
            _ => CopyError::Unsupported("not a regular file".into()),
        });
    }
    let id = SourceId { size: attr.size, mtime: attr.mtime };
    let (part, name) = local_part(local, &id)?;
    let prefix = if opts.resume {
        if !opts.swept {
            remove_stale_local(&part, &name, &id);
        }
        resume::check_get(client, remote, &part, &id).await?
    } else {
        Prefix::Fresh
    };
    let (start, hasher) = match prefix {
        Prefix::Good { len, hasher } => (len, *hasher),
        Prefix::Corrupt { len } => {
            tracing::warn!(path = ?part, len, "partial file does not match the source; starting from zero");
            (0, blake3::Hasher::new())
        }
        Prefix::Fresh => (0, blake3::Hasher::new()),
    };
    bar.set_position(start);

    let size = attr.size;
    let (tx, mut rx) = mpsc::channel::<Bytes>(LOCAL_QUEUE);
    let part_path = part.clone();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<(blake3::Hasher, File)> {
        let mut hasher = hasher;
        let mut file = if start > 0 {
            let mut f = OpenOptions::new().write(true).open(&part_path)?;
            f.set_len(start)?;
            f.seek(SeekFrom::Start(start))?;
            f
        } else {
            File::create(&part_path)?
        };
        // A large file is written around the page cache (see `super::writeback::Direct`: on this
        // VM, filling the page cache is what made slow rounds slow); a smaller one, or when the
        // file system refuses O_DIRECT, through the page cache, with the writeback of what landed
        // started as the file grows, so that the final sync waits for the tail only.
        let mut direct = (size.saturating_sub(start) >= super::writeback::DIRECT_MIN_BYTES)
            .then(|| super::writeback::Direct::open(&part_path, start))
            .flatten();
        let is_direct = direct.is_some();
        let mut behind = super::writeback::Behind::new(start, super::writeback::STEP);
        let mut written = start;
        // Where the writer's time goes (debug line below): waiting for chunks, hashing, writing
        // (of which starting writeback).
        let (mut waiting, mut hashing, mut writing) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut flushing = Duration::ZERO;
        let mut at = Instant::now();
        while let Some(chunk) = rx.blocking_recv() {
            let got = Instant::now();
            waiting += got - at;
            hasher.update(&chunk);
            let hashed = Instant::now();
            hashing += hashed - got;
            if let Some(d) = direct.as_mut() {
                d.write(&chunk)?;
            } else {
                file.write_all(&chunk)?;
                written += chunk.len() as u64;
                if let Some((offset, len)) = behind.due(written) {
                    let flush = Instant::now();
                    super::writeback::start(&file, offset, len);
                    flushing += flush.elapsed();
                }
            }
            at = Instant::now();
            writing += at - hashed;
        }
        if let Some(d) = direct.take() {
            d.finish(&file)?;
        }
        tracing::debug!(?waiting, ?hashing, ?writing, ?flushing, direct = is_direct, "get: local writer");
        Ok((hasher, file))
    });

    // A file of more than one chunk: the server hashes it while it is being sent (its checksum
    // runs beside the reads), and its size and mtime afterwards show whether it changed meanwhile. A change
    // before the server read it shows as a hash that does not match what arrived. For one chunk
    // the checksum goes after the read: the same round trips, without the second look.
    let early = size.saturating_sub(start) > u64::from(CHUNK_BYTES);
    let streaming = Instant::now();
    let (fetched, summed) = futures::join!(
        async {
            let fetched = fetch(client, fh, start, size, tx, bar).await;
            tracing::debug!(path = %remote, elapsed = ?streaming.elapsed(), "get: last chunk received");
            fetched
        },
        async {
            if !early {
                return None;
            }
            let summed = client.checksum(remote, 0, u64::MAX).await;
            tracing::debug!(path = %remote, elapsed = ?streaming.elapsed(), "get: server checksum answered");
            Some(summed)
        }
    );
    let written = writer.await.map_err(join_error)?;
    tracing::debug!(path = %remote, elapsed = ?streaming.elapsed(), "get: written and hashed locally");
    fetched?;
    let (hasher, file) = written?;

    let (hash, covered, now_size, now_mtime) = match summed {
        Some(summed) => {
            // An empty range: only the size and mtime now, of the file the first one hashed.
            let (_, _, now_size, now_mtime) = client.checksum(remote, 0, 0).await?;
            if now_size != size || now_mtime != attr.mtime {
                return Err(CopyError::SourceChanged);
            }
            summed?
        }
        None => client.checksum(remote, 0, u64::MAX).await?,
    };
    if now_size != size || now_mtime != attr.mtime {
        return Err(CopyError::SourceChanged);
    }
    if covered != size || hasher.finalize().as_bytes() != &hash {
        return Err(CopyError::Verify);
    }
    if opts.preserve {
        file.set_permissions(std::fs::Permissions::from_mode(attr.perm & 0o7777))?;
        file.set_modified(system_time(attr.mtime))?;
    }
    drop(file);
    std::fs::rename(&part, local)?;
    Ok(Outcome {
        bytes: size,
        resumed_at: (start > 0).then_some(start),
        sent: size - start,
        elapsed: started.elapsed(),
    })
}

/// Reads `[start, size)` of the remote file with up to [`IN_FLIGHT`] requests at once and passes
/// the chunks, in order, to the local writer.
async fn fetch(
    client: &Client,
    fh: homefs_shared::Fh,
    start: u64,
    size: u64,
    tx: mpsc::Sender<Bytes>,
    bar: &FileProgress,
) -> Result<(), CopyError> {
    let mut in_flight = FuturesOrdered::new();
    let mut next = start;
    loop {
        while next < size && in_flight.len() < IN_FLIGHT {
            let len = u32::try_from((size - next).min(u64::from(CHUNK_BYTES))).unwrap_or(CHUNK_BYTES);
            super::rate::pace(len as usize).await;
            let c = client.clone();
            let at = next;
            in_flight.push_back(async move { c.read(fh, at, len).await.map(|(data, _)| (data, len)) });
            next += u64::from(len);
        }
        match in_flight.next().await {
            Some(Ok((data, asked))) => {
                if data.len() != asked as usize {
                    break Err(CopyError::SourceChanged);
                }
                bar.inc(data.len() as u64);
                if tx.send(data).await.is_err() {
                    // The writer stopped on an error: it reports why.
                    break Ok(());
                }
            }
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        }
    }
}

/// Removes local partial files of `name` from another version of the source (best effort).
fn remove_stale_local(part: &Path, name: &[u8], id: &SourceId) {
    let Some(dir) = part.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if resume::is_stale_part(e.file_name().as_bytes(), name, id) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A local source's metadata and, when it is a regular file of at most [`SMALL_FILE_BYTES`], its
/// bytes, read through the same descriptor (opened non-blocking, so that a FIFO is only stat'ed).
///
/// # Errors
/// The local error; [`CopyError::SourceChanged`] when a small file's size or mtime moved while it
/// was read.
pub(super) fn read_source(path: &Path) -> Result<(std::fs::Metadata, Option<SmallSource>), CopyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        // Not readable (a socket, a file without read permission): what it is decides the error.
        Err(e) => return std::fs::metadata(path).map(|m| (m, None)).map_err(|_| e.into()),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > u64::from(SMALL_FILE_BYTES) {
        return Ok((meta, None));
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte more than allowed shows a file that grew.
    (&file).take(u64::from(SMALL_FILE_BYTES) + 1).read_to_end(&mut data)?;
    let after = file.metadata()?;
    if after.len() != meta.len() || after.modified()? != meta.modified()? {
        return Err(CopyError::SourceChanged);
    }
    // Hashed here, on the blocking thread, while the bytes are in the CPU's cache.
    let hash = blake3::hash(&data);
    Ok((meta, Some(SmallSource { data, hash })))
}

/// A small file's bytes and their BLAKE3.
pub(super) struct SmallSource {
    pub(super) data: Vec<u8>,
    pub(super) hash: blake3::Hash,
}

/// A file of at most [`SMALL_FILE_BYTES`] in one `PutFile`: its bytes (read and hashed by
/// [`read_source`]) sent with its mode (and mtime with `-p`), stored by the server under a temporary name
/// and renamed into place; the server's hash of what it stored must match.
#[allow(clippy::too_many_arguments)]
async fn put_small(
    client: &Client,
    remote: &WirePath,
    meta: &std::fs::Metadata,
    id: SourceId,
    source: SmallSource,
    opts: TransferOptions,
    bar: &FileProgress,
    started: Instant,
) -> Result<Outcome, CopyError> {
    let SmallSource { data, hash } = source;
    if data.len() as u64 != id.size {
        return Err(CopyError::SourceChanged);
    }
    let mode = meta.permissions().mode() & if opts.preserve { 0o7777 } else { 0o777 };
    let mtime = opts.preserve.then_some(id.mtime);
    bar.set_position(0);
    super::rate::pace(data.len()).await;
    match client.put_file(remote, mode, mtime, false, Bytes::from(data)).await {
        Ok((stored, attr)) => {
            if &stored != hash.as_bytes() || attr.size != id.size {
                return Err(CopyError::Verify);
            }
        }
        Err(e) if e.code == ErrorCode::QuotaExceeded => {
            let free = client.statfs().await.map(|s| s.free_bytes).unwrap_or(0);
            return Err(CopyError::Quota { needs: id.size, free });
        }
        Err(e) => return Err(e.into()),
    }
    bar.inc(id.size);
    Ok(Outcome { bytes: id.size, resumed_at: None, sent: id.size, elapsed: started.elapsed() })
}

/// A file in one `GetFile`, written under a temporary name and renamed into place once its hash
/// matches. `None` when the file is larger than one request: the caller streams it.
async fn get_small(
    client: &Client,
    remote: &WirePath,
    local: &Path,
    opts: TransferOptions,
    bar: &FileProgress,
) -> Result<Option<Outcome>, CopyError> {
    let started = Instant::now();
    let (attr, hash, data) = client.get_file(remote, SMALL_FILE_BYTES).await?;
    // Paid after the fact: its size is known once it is here.
    super::rate::pace(data.len()).await;
    match attr.kind {
        FileKind::File => {}
        FileKind::Dir => return Err(CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir))),
        _ => return Err(CopyError::Unsupported("not a regular file".into())),
    }
    let got = data.len() as u64;
    if got < attr.size {
        if got == u64::from(SMALL_FILE_BYTES) {
            return Ok(None);
        }
        // It shrank while the server read it.
        return Err(CopyError::SourceChanged);
    }
    if blake3::hash(&data).as_bytes() != &hash {
        return Err(CopyError::Verify);
    }
    let id = SourceId { size: attr.size, mtime: attr.mtime };
    let (part, _) = local_part(local, &id)?;
    let to = local.to_path_buf();
    tokio::task::spawn_blocking(move || store_local(&part, &to, &data, &attr, opts.preserve))
        .await
        .map_err(join_error)??;
    bar.inc(attr.size);
    Ok(Some(Outcome { bytes: attr.size, resumed_at: None, sent: attr.size, elapsed: started.elapsed() }))
}

/// Writes a small file's verified bytes to `part`, with the source's mode and mtime when
/// `preserve`, and renames it to `to`; on failure `part` is removed. Blocking.
pub(super) fn store_local(
    part: &Path,
    to: &Path,
    data: &[u8],
    attr: &homefs_shared::Attr,
    preserve: bool,
) -> io::Result<()> {
    let stored = (|| {
        let mut file = File::create(part)?;
        file.write_all(data)?;
        if preserve {
            file.set_permissions(std::fs::Permissions::from_mode(attr.perm & 0o7777))?;
            file.set_modified(system_time(attr.mtime))?;
        }
        drop(file);
        std::fs::rename(part, to)
    })();
    if stored.is_err() {
        let _ = std::fs::remove_file(part);
    }
    stored
}

/// Makes everything this client put durable: one `SyncFs` on the server.
///
/// # Errors
/// The server's or the connection's error.
pub async fn sync_remote(client: &Client) -> Result<(), CopyError> {
    client.sync_fs().await.map_err(CopyError::from)
}

/// Makes what a get wrote locally durable: each of `paths` (files, directories; a symlink is not
/// followed, its directory keeps it) is fsynced, after the writeback of all of them was started,
/// then each parent directory once; or, when that is expected to be cheaper, one `syncfs` of each
/// file system holding them. The choice is fsd's for `Sync` (fsd/src/ops/whole.rs, measured
/// there): an fsync costs ~66 us a path, a `syncfs` ~4 ms plus the writeback of everything dirty on
/// the file system (other processes' data too: 1 GiB took ~300 ms); the dirty amount is read from
/// `/proc/meminfo` (system-wide, an over-estimate that leans toward the fsyncs). A path that is
/// gone is skipped.
///
/// # Errors
/// The first fsync, `syncfs` or open that failed.
pub fn sync_local<'a>(paths: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let paths: Vec<&Path> = paths.into_iter().collect();
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    if sync_cost::syncfs_is_cheaper(paths.len() + dirs.len(), sync_cost::dirty_bytes()) {
        return sync_file_systems(&dirs);
    }
    let mut files = Vec::with_capacity(paths.len());
    for p in &paths {
        match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(p) {
            Ok(f) => {
                // Starts the writeback without waiting, so that the fsyncs below mostly wait. Not
                // for a larger file: its writeback was started as it streamed in (see
                // `super::writeback`), and the advice would also drop its cached pages that are
                // clean by now (~50 ms for 1 GiB), for nothing.
                if f.metadata().is_ok_and(|m| m.len() <= super::writeback::STEP) {
                    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
                }
                files.push(f);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
    }
    for f in &files {
        f.sync_all()?;
    }
    for d in &dirs {
        match File::open(d) {
            Ok(f) => f.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `syncfs` of each file system holding one of `dirs` (a directory that is gone is skipped).
fn sync_file_systems(dirs: &[PathBuf]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else { continue };
        if seen.insert(meta.dev()) {
            let fd = File::open(dir)?;
            rustix::fs::syncfs(&fd)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sync_takes_fsyncs_when_few_or_much_is_dirty() {
        assert!(sync_cost::dirty_bytes().is_some(), "/proc/meminfo is readable here");
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        std::os::unix::fs::symlink("/nowhere", dir.path().join("l")).expect("symlink");
        let (l, gone) = (dir.path().join("l"), dir.path().join("gone"));
        sync_local([f.as_path(), l.as_path(), gone.as_path(), dir.path()]).expect("synced");
    }

    #[test]
    fn times_round_trip() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp { secs: 1_700_000_000, nanos: 123_456_789 },
            Timestamp { secs: -5, nanos: 250_000_000 },
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
    }
}
