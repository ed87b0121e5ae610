//! Small files in batches: a tree's small files grouped into `PutFiles`/`GetFiles` requests (one
//! round trip and one blocking hop on each side per batch instead of per file), each file still
//! verified end to end (its BLAKE3 on this side against the server's) and reported on its own;
//! the end of a put made durable with `Sync` of the paths this run wrote. A server that does not
//! know these requests (an older fsd) gets the per-file requests instead, for the rest of the run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use futures::stream::{self, StreamExt};
use homefs_shared::{ErrorCode, FileKind, PutItem, WireError, WirePath, MAX_BATCH_FILES, MAX_SYNC_PATHS};
use std::os::unix::fs::PermissionsExt;

use super::progress::{FileProgress, Outcome};
use super::resume::SourceId;
use super::transfer::{self, timestamp, TransferOptions};
use super::CopyError;
use crate::client::Client;

/// Files up to this size go in batches; larger ones on their own (one `PutFile`/`GetFile` up to
/// 1 MiB, streamed beyond). A batch is one request, so a large file in it would hold the small
/// ones behind it.
pub const BATCH_FILE_BYTES: u64 = 256 << 10;
/// The most files in one batch: 64 files of 4 KiB make a 256 KiB frame, about the size at which
/// a request's bytes are still in the CPU's cache when they are hashed (see transfer's
/// `CHUNK_BYTES`), and a 5,000-file tree makes ~80 batches, enough to keep `-j` requests in flight.
pub const BATCH_MAX_FILES: usize = 64;
/// The most file bytes in one batch (at most a quarter of a frame's data).
pub const BATCH_MAX_BYTES: u64 = 1 << 20;
/// The most path bytes in one request (a header holds at most `MAX_HEADER_BYTES`, 256 KiB).
const BATCH_MAX_PATH_BYTES: usize = 64 << 10;
const _: () = assert!(BATCH_MAX_FILES <= MAX_BATCH_FILES);

/// Whether this run still sends batches: on until the server refuses one as unknown.
#[derive(Debug)]
pub struct Batches {
    on: AtomicBool,
    /// A batch was answered: the server knows the requests (a later lost connection is a loss).
    answered: AtomicBool,
}

impl Batches {
    /// Batches on (`enabled`), or the per-file requests only.
    pub fn new(enabled: bool) -> Batches {
        Batches { on: AtomicBool::new(enabled), answered: AtomicBool::new(false) }
    }

    /// Whether batches are (still) sent.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// A whole batch request failed with `e`: turns batches off when that means the server does
    /// not know them. Returns whether it did.
    fn refused(&self, e: &WireError) -> bool {
        let off = is_unknown_request(e, self.answered.load(Ordering::Relaxed));
        if off && self.on.swap(false, Ordering::Relaxed) {
            tracing::info!(error = %e, "the server does not take batches; one request per file");
        }
        off
    }
}

/// Whether a batch request's failure means the server does not know the request: an fsd that
/// predates it answers `Protocol`/`NoSys`/`NotSupported`, or (protocol 1 servers cannot decode an
/// unknown variant) closes the connection, which the client reports as `Io`. A lost connection
/// after a batch was answered is a real loss, not a refusal.
pub fn is_unknown_request(e: &WireError, answered_before: bool) -> bool {
    match e.code {
        ErrorCode::Protocol | ErrorCode::NoSys | ErrorCode::NotSupported => true,
        ErrorCode::Io | ErrorCode::NotConnected => !answered_before,
        _ => false,
    }
}

/// Splits `files` (each with its size) into runs: batches of small files (at most
/// [`BATCH_MAX_FILES`] files, [`BATCH_MAX_BYTES`] bytes and [`BATCH_MAX_PATH_BYTES`] of paths) and
/// the larger files one by one. `path_len` gives the length of a file's remote path.
pub fn group<T>(files: Vec<T>, size: impl Fn(&T) -> u64, path_len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut units = Vec::new();
    let mut batch: Vec<T> = Vec::new();
    let (mut bytes, mut path_bytes) = (0u64, 0usize);
    for f in files {
        let (n, p) = (size(&f), path_len(&f));
        if n > BATCH_FILE_BYTES {
            units.push(vec![f]);
            continue;
        }
        if !batch.is_empty()
            && (batch.len() >= BATCH_MAX_FILES || bytes + n > BATCH_MAX_BYTES || path_bytes + p > BATCH_MAX_PATH_BYTES)
        {
            units.push(std::mem::take(&mut batch));
            (bytes, path_bytes) = (0, 0);
        }
        bytes += n;
        path_bytes += p;
        batch.push(f);
    }
    if !batch.is_empty() {
        units.push(batch);
    }
    units
}

/// One file of a put batch: local source, remote target, the source's version, its bar.
pub type PutFile = (PathBuf, WirePath, SourceId, FileProgress);
/// One file of a get batch: remote source, local target, the source's version, its bar.
pub type GetFile = (WirePath, PathBuf, SourceId, FileProgress);

/// Puts `files` in one `PutFiles` (read locally in one blocking hop), each compared with the
/// server's hash of what it stored; returns each file's outcome, in order. Files that are no
/// longer small, that changed or failed to verify, and all of them when the batch itself failed,
/// go through [`transfer::put`] (with its retries), `jobs` at once.
pub async fn put(
    client: &Client,
    files: &[PutFile],
    opts: TransferOptions,
    batches: &Batches,
    jobs: usize,
) -> Vec<Result<Outcome, CopyError>> {
    let started = Instant::now();
    let mut results: Vec<Option<Result<Outcome, CopyError>>> = (0..files.len()).map(|_| None).collect();
    if batches.is_on() {
        let sources: Vec<PathBuf> = files.iter().map(|f| f.0.clone()).collect();
        let read =
            tokio::task::spawn_blocking(move || sources.iter().map(|p| transfer::read_source(p)).collect::<Vec<_>>())
                .await
                .unwrap_or_default();
        let mut items = Vec::new();
        let mut hashes = Vec::new();
        let mut data = BytesMut::new();
        for (i, r) in read.into_iter().enumerate() {
            // Anything but a small regular file read whole: on its own, with the full checks.
            let Ok((meta, Some(src))) = r else { continue };
            let (Ok(len), Ok(mtime)) = (u32::try_from(src.data.len()), meta.modified()) else { continue };
            let mode = meta.permissions().mode() & if opts.preserve { 0o7777 } else { 0o777 };
            items.push(PutItem {
                path: files[i].1.clone(),
                mode,
                mtime: opts.preserve.then_some(timestamp(mtime)),
                len,
            });
            hashes.push((i, src.hash));
            data.extend_from_slice(&src.data);
        }
        if !items.is_empty() {
            super::rate::pace(data.len()).await;
            let (n, bytes, sent) = (items.len(), data.len(), Instant::now());
            let answered = client.put_files(items, data.freeze()).await;
            tracing::debug!(files = n, bytes, read = ?sent - started, answered = ?sent.elapsed(), "batch put");
            match answered {
                Ok(stored) => {
                    batches.answered();
                    let mut free = None;
                    for ((i, hash), r) in hashes.into_iter().zip(stored) {
                        let bar = &files[i].3;
                        results[i] = match r {
                            Ok(s) if &s.hash == hash.as_bytes() => {
                                bar.inc(s.attr.size);
                                Some(Ok(Outcome {
                                    bytes: s.attr.size,
                                    resumed_at: None,
                                    sent: s.attr.size,
                                    elapsed: started.elapsed(),
                                }))
                            }
                            // Did not verify: once more on its own, from scratch.
                            Ok(_) => None,
                            Err(e) if e.code == ErrorCode::QuotaExceeded => {
                                if free.is_none() {
                                    free = Some(client.statfs().await.map(|s| s.free_bytes).unwrap_or(0));
                                }
                                let needs = files[i].2.size;
                                Some(Err(CopyError::Quota { needs, free: free.unwrap_or(0) }))
                            }
                            Err(e) => Some(Err(e.into())),
                        };
                    }
                }
                Err(e) => {
                    batches.refused(&e);
                    tracing::debug!(error = %e, files = files.len(), "batch put failed; one request per file");
                }
            }
        }
    }
    let alone: Vec<usize> = (0..files.len()).filter(|&i| results[i].is_none()).collect();
    let done: Vec<_> = stream::iter(alone)
        .map(|i| async move {
            let (from, to, _, bar) = &files[i];
            (i, transfer::put(client, from, to, opts, bar).await)
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    for (i, r) in done {
        results[i] = Some(r);
    }
    results.into_iter().map(|r| r.unwrap_or(Err(CopyError::Unsupported("not copied".into())))).collect()
}

/// Gets `files` in one `GetFiles`, each compared with the server's hash of what it read, written
/// under a temporary name and renamed into place (all in one blocking hop); returns each file's
/// outcome, in order. Files that did not fit or did not verify, and all of them when the batch
/// itself failed, go through [`transfer::get_sized`] (with its retries), `jobs` at once.
pub async fn get(
    client: &Client,
    files: &[GetFile],
    opts: TransferOptions,
    batches: &Batches,
    jobs: usize,
) -> Vec<Result<Outcome, CopyError>> {
    let started = Instant::now();
    let mut results: Vec<Option<Result<Outcome, CopyError>>> = (0..files.len()).map(|_| None).collect();
    if batches.is_on() {
        let paths = files.iter().map(|f| f.0.clone()).collect();
        match client.get_files(paths, homefs_shared::MAX_DATA_BYTES).await {
            Ok(got) => {
                batches.answered();
                let total: usize = got.iter().map(|r| r.as_ref().map_or(0, |(_, b)| b.len())).sum();
                // Paid after the fact: the sizes are known once the bytes are here.
                super::rate::pace(total).await;
                // What to store locally: (index, temporary name, target, bytes, attributes).
                let mut stores = Vec::new();
                for (i, r) in got.into_iter().enumerate() {
                    let (item, bytes) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            results[i] = Some(Err(e.into()));
                            continue;
                        }
                    };
                    match item.attr.kind {
                        FileKind::File => {}
                        FileKind::Dir => {
                            results[i] = Some(Err(CopyError::Unsupported(format!("{} (use -r)", ErrorCode::IsDir))));
                            continue;
                        }
                        _ => {
                            results[i] = Some(Err(CopyError::Unsupported("not a regular file".into())));
                            continue;
                        }
                    }
                    // Did not fit, shrank, or did not verify: on its own (which says which).
                    if u64::from(item.len) != item.attr.size || blake3::hash(&bytes).as_bytes() != &item.hash {
                        continue;
                    }
                    let id = SourceId { size: item.attr.size, mtime: item.attr.mtime };
                    match transfer::local_part(&files[i].1, &id) {
                        Ok((part, _)) => stores.push((i, part, files[i].1.clone(), bytes, item.attr)),
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
                let preserve = opts.preserve;
                let stored = tokio::task::spawn_blocking(move || {
                    stores
                        .into_iter()
                        .map(|(i, part, to, bytes, attr)| {
                            (i, attr.size, transfer::store_local(&part, &to, &bytes, &attr, preserve))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                for (i, size, r) in stored {
                    results[i] = Some(match r {
                        Ok(()) => {
                            files[i].3.inc(size);
                            Ok(Outcome { bytes: size, resumed_at: None, sent: size, elapsed: started.elapsed() })
                        }
                        Err(e) => Err(e.into()),
                    });
                }
            }
            Err(e) => {
                batches.refused(&e);
                tracing::debug!(error = %e, files = files.len(), "batch get failed; one request per file");
            }
        }
    }
    let alone: Vec<usize> = (0..files.len()).filter(|&i| results[i].is_none()).collect();
    let done: Vec<_> = stream::iter(alone)
        .map(|i| async move {
            let (from, to, id, bar) = &files[i];
            (i, transfer::get_sized(client, from, to, opts, bar, Some(id.size)).await)
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    for (i, r) in done {
        results[i] = Some(r);
    }
    results.into_iter().map(|r| r.unwrap_or(Err(CopyError::Unsupported("not copied".into())))).collect()
}

/// Makes `paths` (what this run stored, made or replaced on the server) durable: `Sync` requests
/// of at most [`MAX_SYNC_PATHS`] paths and [`SYNC_MAX_PATH_BYTES`] of them, `jobs` at once; one
/// `SyncFs` instead when batches are off or the server does not know `Sync`.
///
/// # Errors
/// The server's or the connection's error.
pub async fn sync(client: &Client, paths: Vec<WirePath>, batches: &Batches, jobs: usize) -> Result<(), CopyError> {
    if paths.is_empty() {
        return Ok(());
    }
    if batches.is_on() {
        let chunks = chunk_paths(paths);
        let synced: Vec<Result<(), WireError>> =
            stream::iter(chunks).map(|c| client.sync_paths(c)).buffer_unordered(jobs.max(1)).collect().await;
        match synced.into_iter().find_map(Result::err) {
            None => return Ok(()),
            Some(e) if !batches.refused(&e) => return Err(e.into()),
            Some(_) => {}
        }
    }
    transfer::sync_remote(client).await
}

/// Path bytes in one `Sync` (about 3/4 of a header's `MAX_HEADER_BYTES`, leaving room for the
/// encoding's length prefixes: at most 2 bytes a path of up to 4096 bytes).
const SYNC_MAX_PATH_BYTES: usize = 160 << 10;

/// `paths` in pieces of at most [`MAX_SYNC_PATHS`] paths and [`SYNC_MAX_PATH_BYTES`] of them.
fn chunk_paths(paths: Vec<WirePath>) -> Vec<Vec<WirePath>> {
    let mut out: Vec<Vec<WirePath>> = Vec::new();
    let mut bytes = 0;
    for p in paths {
        let n = p.as_bytes().len();
        match out.last_mut() {
            Some(last) if last.len() < MAX_SYNC_PATHS && bytes + n <= SYNC_MAX_PATH_BYTES => {
                bytes += n;
                last.push(p);
            }
            _ => {
                bytes = n;
                out.push(vec![p]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_request_turns_batches_off_only_when_refused() {
        let e = |code| WireError::new(code, "x");
        // An older fsd: refuses the variant, or closes the connection on it.
        assert!(is_unknown_request(&e(ErrorCode::Protocol), false));
        assert!(is_unknown_request(&e(ErrorCode::NoSys), true));
        assert!(is_unknown_request(&e(ErrorCode::NotSupported), false));
        assert!(is_unknown_request(&e(ErrorCode::Io), false));
        // A lost connection after a batch was answered is a loss, not a refusal.
        assert!(!is_unknown_request(&e(ErrorCode::Io), true));
        assert!(!is_unknown_request(&e(ErrorCode::QuotaExceeded), false));
        assert!(!is_unknown_request(&e(ErrorCode::TooBig), false));

        let b = Batches::new(true);
        assert!(!b.refused(&e(ErrorCode::TooBig)) && b.is_on());
        b.answered();
        assert!(!b.refused(&e(ErrorCode::Io)) && b.is_on());
        assert!(b.refused(&e(ErrorCode::Protocol)) && !b.is_on());
    }

    #[test]
    fn groups_small_files_and_leaves_large_ones_alone() {
        // 200 files of 4 KiB, one of 300 KiB in the middle, then 10 of 200 KiB.
        let mut sizes = vec![4096u64; 100];
        sizes.push(300 << 10);
        sizes.extend([4096u64; 100]);
        sizes.extend([200 << 10; 10]);
        let units = group(sizes, |s| *s, |_| 10);
        let lens: Vec<usize> = units.iter().map(Vec::len).collect();
        // 64 + 36 small, the large one alone, 64 + 36 small... : the large one does not end a batch.
        assert_eq!(lens[0], 64);
        assert!(units.iter().any(|u| u == &vec![300 << 10]));
        assert!(units.iter().all(|u| u.len() <= BATCH_MAX_FILES));
        assert!(units.iter().all(|u| u.len() == 1 || u.iter().sum::<u64>() <= BATCH_MAX_BYTES));
        assert_eq!(units.iter().map(Vec::len).sum::<usize>(), 211);
        // Long paths end a batch early.
        let units = group(vec![1u64; 100], |s| *s, |_| 4000);
        assert!(units.iter().all(|u| u.len() * 4000 <= BATCH_MAX_PATH_BYTES));
    }

    #[test]
    fn sync_paths_in_pieces() {
        // `a/a/.../a`: n bytes of short names (a name is at most 255 bytes, a path 4096).
        let p = |n: usize| {
            WirePath::new((0..n).map(|i| if i % 2 == 1 { b'/' } else { b'a' }).collect::<Vec<u8>>()).expect("valid")
        };
        assert!(chunk_paths(Vec::new()).is_empty());
        // The bench's tree: 5,000 files and 50 directories in one request.
        assert_eq!(chunk_paths((0..5050).map(|_| p(25)).collect()).len(), 1);
        let lens: Vec<usize> = chunk_paths((0..20000).map(|_| p(1)).collect()).iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_SYNC_PATHS, 20000 - MAX_SYNC_PATHS]);
        let long = chunk_paths((0..100).map(|_| p(3999)).collect());
        assert!(long.iter().all(|c| c.len() * 3999 <= SYNC_MAX_PATH_BYTES) && long.len() > 1);
    }
}
