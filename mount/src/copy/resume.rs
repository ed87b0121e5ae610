//! Resuming an interrupted transfer: the partial file's name, and the check of its prefix.
//!
//! Design. A transfer writes to `.NAME.TAG.homefs-part` in the target directory (remote for a put,
//! local for a get), renamed over `NAME` only once the whole file verifies. `TAG` is 16 hex digits
//! of BLAKE3(source size, source mtime): a source that changed (size or mtime) gets another name,
//! so its old partial file is never continued; the next run removes such stale partials. Nothing
//! is trusted by size: before continuing, the partial file's prefix `[0, n)` is hashed on both
//! sides at once (the server's range checksum, and BLAKE3 of the source's first `n` bytes here);
//! only when both agree are the remaining bytes sent.
//!
//! A put writes up to [`IN_FLIGHT`] chunks at once and the server may finish them in any order, so
//! a killed put can leave a partial file whose last few chunks have holes: its size is not a safe
//! prefix. When the whole partial file does not match, one more prefix is probed, in the same
//! round trip: the size rounded down to a chunk, less [`IN_FLIGHT`] chunks. When a chunk was sent,
//! every chunk more than [`IN_FLIGHT`] before it had been acknowledged, so that prefix was complete
//! when the copy stopped. If neither matches (a corrupted partial file, or a source rewritten with
//! the same size and mtime), the file restarts from zero. We do not search further (halving): each
//! probe hashes up to the whole prefix on both ends, corruption is rare, and a restart costs at
//! most one more full copy. The local hash of the prefix also seeds the whole-file hash, so the
//! prefix is read once.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use homefs_shared::{ErrorCode, FileKind, Timestamp, WirePath};

use super::transfer::{CHUNK_BYTES, IN_FLIGHT};
use super::CopyError;
use crate::client::Client;

/// The suffix of every partial file.
pub const PART_SUFFIX: &[u8] = b".homefs-part";

/// Read size for hashing local files.
const HASH_CHUNK: usize = 1 << 20;

/// What identifies a version of the source: if either changes, a partial copy is not continued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId {
    pub size: u64,
    pub mtime: Timestamp,
}

impl SourceId {
    /// 16 hex digits of BLAKE3(size, mtime).
    pub fn tag(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        h.update(&self.mtime.secs.to_le_bytes());
        h.update(&self.mtime.nanos.to_le_bytes());
        h.finalize().to_hex()[..16].to_string()
    }
}

/// The stem every partial file of `name` starts with: `.NAME.` (a long name is replaced by a hash
/// of it so the partial name stays within 255 bytes).
fn part_stem(name: &[u8]) -> Vec<u8> {
    let mut stem = vec![b'.'];
    if name.len() + 1 + 1 + 16 + PART_SUFFIX.len() > homefs_shared::path::MAX_NAME_BYTES {
        stem.extend_from_slice(blake3::hash(name).to_hex()[..32].as_bytes());
    } else {
        stem.extend_from_slice(name);
    }
    stem.push(b'.');
    stem
}

/// The partial file's name for `name` copied from the source version `id`.
pub fn part_name(name: &[u8], id: &SourceId) -> Vec<u8> {
    let mut v = part_stem(name);
    v.extend_from_slice(id.tag().as_bytes());
    v.extend_from_slice(PART_SUFFIX);
    v
}

/// Whether `entry` is a partial file of `name` from another source version than `id`.
pub fn is_stale_part(entry: &[u8], name: &[u8], id: &SourceId) -> bool {
    let stem = part_stem(name);
    entry.starts_with(&stem)
        && entry.ends_with(PART_SUFFIX)
        && entry.len() == stem.len() + 16 + PART_SUFFIX.len()
        && entry != part_name(name, id).as_slice()
}

/// What the check of a partial file found.
pub enum Prefix {
    /// No partial file (or an empty one): start at zero.
    Fresh,
    /// The first `len` bytes agree on both sides; `hasher` has hashed them.
    Good { len: u64, hasher: Box<blake3::Hasher> },
    /// A partial file of `len` bytes whose hash differs: start at zero.
    Corrupt { len: u64 },
}

/// BLAKE3 of the first `n` bytes of a local file, as a hasher to continue, and (if `checkpoint` is
/// not zero) a copy of the hasher after the first `checkpoint` bytes; `None` if the file is shorter
/// than `n`.
///
/// # Errors
/// Reading the file.
pub fn hash_local_prefix(
    path: &Path,
    n: u64,
    checkpoint: u64,
) -> io::Result<Option<(blake3::Hasher, Option<blake3::Hasher>)>> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut at_checkpoint = None;
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut done = 0u64;
    while done < n {
        if checkpoint > 0 && done == checkpoint {
            at_checkpoint = Some(hasher.clone());
        }
        // Stop each read at the checkpoint, so the snapshot falls exactly on it.
        let limit = if checkpoint > done { checkpoint.min(n) } else { n };
        let want = usize::try_from((limit - done).min(HASH_CHUNK as u64)).unwrap_or(HASH_CHUNK);
        let got = match file.read(&mut buf[..want]) {
            Ok(0) => return Ok(None),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        done += got as u64;
    }
    Ok(Some((hasher, at_checkpoint)))
}

/// The second prefix probed when the whole partial file does not match (0: none), see the doc.
fn fallback_prefix(n: u64) -> u64 {
    let chunk = u64::from(CHUNK_BYTES);
    let fb = (n / chunk).saturating_sub(IN_FLIGHT as u64) * chunk;
    if fb < n {
        fb
    } else {
        0
    }
}

type LocalPrefix = Option<(blake3::Hasher, Option<blake3::Hasher>)>;

async fn local_prefix(path: &Path, n: u64, checkpoint: u64) -> Result<LocalPrefix, CopyError> {
    let path = path.to_path_buf();
    let joined = tokio::task::spawn_blocking(move || hash_local_prefix(&path, n, checkpoint)).await;
    joined.map_err(|e| CopyError::Local(io::Error::other(e)))?.map_err(CopyError::Local)
}

/// Compares the two sides' hashes of `[0, n)`, and of the fallback prefix when `fallback` is set.
async fn compare(
    client: &Client,
    remote: &WirePath,
    local: &Path,
    n: u64,
    fallback: bool,
) -> Result<Prefix, CopyError> {
    let fb = if fallback { fallback_prefix(n) } else { 0 };
    let fb_sum = async {
        match fb {
            0 => None,
            _ => Some(client.checksum(remote, 0, fb).await),
        }
    };
    let (remote_sum, remote_fb, local_sum) =
        tokio::join!(client.checksum(remote, 0, n), fb_sum, local_prefix(local, n, fb));
    let (hash, covered, _, _) = remote_sum?;
    let Some((hasher, at_fb)) = local_sum? else { return Ok(Prefix::Corrupt { len: n }) };
    if covered == n && hasher.finalize().as_bytes() == &hash {
        return Ok(Prefix::Good { len: n, hasher: Box::new(hasher) });
    }
    if let (Some(Ok((fb_hash, fb_covered, _, _))), Some(fb_hasher)) = (remote_fb, at_fb) {
        if fb_covered == fb && fb_hasher.finalize().as_bytes() == &fb_hash {
            return Ok(Prefix::Good { len: fb, hasher: Box::new(fb_hasher) });
        }
    }
    Ok(Prefix::Corrupt { len: n })
}

/// For a put: checks the remote partial file `part` against the local `source`.
///
/// # Errors
/// The server's errors other than "not found", and local read errors.
pub async fn check_put(client: &Client, part: &WirePath, source: &Path, id: &SourceId) -> Result<Prefix, CopyError> {
    let attr = match client.stat(part).await {
        Ok(a) => a,
        Err(e) if e.code == ErrorCode::NotFound => return Ok(Prefix::Fresh),
        Err(e) => return Err(e.into()),
    };
    if attr.kind != FileKind::File || attr.size == 0 {
        return Ok(Prefix::Fresh);
    }
    if attr.size > id.size {
        return Ok(Prefix::Corrupt { len: attr.size });
    }
    compare(client, part, source, attr.size, true).await
}

/// For a get: checks the local partial file `part` against the remote `source`.
///
/// # Errors
/// The server's errors, and local errors other than "not found".
pub async fn check_get(client: &Client, source: &WirePath, part: &Path, id: &SourceId) -> Result<Prefix, CopyError> {
    let meta = match std::fs::symlink_metadata(part) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Prefix::Fresh),
        Err(e) => return Err(e.into()),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(Prefix::Fresh);
    }
    if meta.len() > id.size {
        return Ok(Prefix::Corrupt { len: meta.len() });
    }
    // The local partial file of a get is written in order, so its size is a clean prefix.
    compare(client, source, part, meta.len(), false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let id = SourceId { size: 10, mtime: Timestamp { secs: 1, nanos: 2 } };
        let other = SourceId { size: 11, ..id };
        let p = part_name(b"big.iso", &id);
        assert!(p.starts_with(b".big.iso.") && p.ends_with(b".homefs-part"));
        assert_ne!(p, part_name(b"big.iso", &other));
        assert!(is_stale_part(&part_name(b"big.iso", &other), b"big.iso", &id));
        assert!(!is_stale_part(&p, b"big.iso", &id));
        assert!(!is_stale_part(b".big.iso.x.homefs-part", b"big.iso", &id));
        let long = vec![b'x'; 255];
        assert!(part_name(&long, &id).len() <= 255);
    }

    #[test]
    fn local_prefix_hash() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello world").unwrap();
        let (h, cp) = hash_local_prefix(&f, 5, 3).unwrap().unwrap();
        assert_eq!(h.finalize(), blake3::hash(b"hello"));
        assert_eq!(cp.unwrap().finalize(), blake3::hash(b"hel"));
        let (_, none) = hash_local_prefix(&f, 5, 0).unwrap().unwrap();
        assert!(none.is_none());
        assert!(hash_local_prefix(&f, 100, 0).unwrap().is_none());
    }

    #[test]
    fn fallback_prefix_lies_chunks_behind() {
        let chunk = u64::from(CHUNK_BYTES);
        let behind = IN_FLIGHT as u64;
        assert_eq!(fallback_prefix(5 * chunk), 0);
        assert_eq!(fallback_prefix(behind * chunk), 0);
        assert_eq!(fallback_prefix((behind + 12) * chunk + 7), 12 * chunk);
        assert_eq!(fallback_prefix((behind + 12) * chunk), 12 * chunk);
    }
}
