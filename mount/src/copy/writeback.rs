//! Writeback started while a download lands, so that the sync that makes a get durable at the end
//! waits only for the tail instead of writing everything: for a streamed file, every [`STEP`]
//! bytes written the kernel is told to start writing that range to disk (without waiting); for a
//! tree of small files, a `syncfs` of the destination's file system runs on a thread of its own
//! each time another part of the tree has landed ([`Flusher`]), while the next batches arrive.
//!
//! A large download skips the page cache instead ([`Direct`]): O_DIRECT writes from two
//! buffers of its own, on a thread of their own, so nothing is left dirty for the final sync.
//!
//! `posix_fadvise(DONTNEED)` on a range starts its writeback (WB_SYNC_NONE) and drops the pages
//! that are already clean; dirty pages and pages under writeback stay cached. No `unsafe`
//! (`sync_file_range` is not in rustix); fsd's `Sync` starts writeback the same way.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Bytes between two writeback starts of one file. Measured on a 1 GiB get (2-core VM, fresh
/// ext4 on a loop device): the final sync took ~360 ms when nothing was written back before it.
pub const STEP: u64 = 16 << 20;

/// Which range of a file being written sequentially is due for writeback.
#[derive(Debug)]
pub struct Behind {
    /// Everything before this offset was handed to the kernel already.
    started: u64,
    step: u64,
}

impl Behind {
    /// A file written from `offset` on (what lies before it, a resumed prefix, is not started here).
    pub fn new(offset: u64, step: u64) -> Behind {
        Behind { started: offset, step: step.max(1) }
    }

    /// Once the file holds `written` bytes: the range `(offset, len)` whose writeback to start now,
    /// when at least one step has landed since the last start.
    pub fn due(&mut self, written: u64) -> Option<(u64, u64)> {
        if written < self.started.saturating_add(self.step) {
            return None;
        }
        let range = (self.started, written - self.started);
        self.started = written;
        Some(range)
    }
}

/// Starts the writeback of `len` bytes of `file` from `offset`, without waiting (best effort: a
/// file system that ignores the advice is synced at the end all the same).
pub fn start(file: &File, offset: u64, len: u64) {
    if let Some(len) = NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
}

/// Bytes per direct write of a download ([`Direct`]): a 1 GiB `dd oflag=direct bs=4M` to this
/// VM's loop device took 0.47-0.64 s, about what the file's network stream leaves the writer.
pub const DIRECT_BYTES: usize = 4 << 20;
/// What O_DIRECT needs aligned: the buffer's address, the file offset and the length (a logical
/// block is at most this on the usual devices).
pub const DIRECT_ALIGN: usize = 4096;
/// Files from this size on are downloaded with [`Direct`] writes; smaller ones through the page cache.
pub const DIRECT_MIN_BYTES: u64 = STEP;

/// A download written around the page cache (O_DIRECT), in [`DIRECT_BYTES`] pieces, the tail
/// (less than a block) through the page cache at the end. Two buffers: while a thread of its own
/// writes one (a direct write waits for the device), the caller fills the other.
///
/// Why: on this VM, memory freed is handed back to the host (virtio-balloon free page reporting)
/// and faulted in again on first touch, so filling the page cache with 1 GiB cost 0.3-0.9 s of
/// the get's writer depending on the round (a buffered `dd` of 1 GiB + fsync: 3.1 s, then 0.56 s);
/// direct writes reuse two buffers, leave nothing dirty for the final sync, and take less CPU.
/// The file is not left in the page cache (scp leaves it there).
#[derive(Debug)]
pub struct Direct {
    /// The buffer being filled: [`DIRECT_BYTES`] from `.1` on are aligned; `fill` bytes are set.
    buf: Aligned,
    fill: usize,
    /// The file offset of the buffer's first byte.
    pos: u64,
    /// The other buffer, when it is not being written.
    spare: Option<Aligned>,
    /// Full buffers (and their file offsets) to the writing thread, and back once written (or
    /// the write's error).
    to_io: Option<mpsc::SyncSender<(Aligned, u64)>>,
    from_io: mpsc::Receiver<io::Result<Aligned>>,
    io: Option<std::thread::JoinHandle<()>>,
    fd: Arc<File>,
}

/// A buffer and the offset into it where [`DIRECT_BYTES`] aligned bytes start.
type Aligned = (Vec<u8>, usize);

/// A buffer of [`DIRECT_BYTES`] at an aligned offset into it.
fn aligned_buffer() -> Option<Aligned> {
    let buf = vec![0u8; DIRECT_BYTES + DIRECT_ALIGN];
    let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
    (at + DIRECT_BYTES <= buf.len()).then_some((buf, at))
}

impl Direct {
    /// Opens `path` for direct writes from `pos` on; `None` when `pos` is not block-aligned or
    /// the file system refuses O_DIRECT (the caller then writes through the page cache).
    pub fn open(path: &Path, pos: u64) -> Option<Direct> {
        if pos % DIRECT_ALIGN as u64 != 0 {
            return None;
        }
        let fd = Arc::new(OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()?);
        let (buf, spare) = (aligned_buffer()?, aligned_buffer()?);
        // One buffer in flight at a time: the channels never hold more than one each.
        let (to_io, jobs) = mpsc::sync_channel::<(Aligned, u64)>(1);
        let (done, from_io) = mpsc::sync_channel(1);
        let out = Arc::clone(&fd);
        let io = std::thread::Builder::new()
            .name("netcp-direct".into())
            .spawn(move || {
                for ((b, at), pos) in jobs {
                    let written = out.write_all_at(&b[at..at + DIRECT_BYTES], pos).map(|()| (b, at));
                    if done.send(written).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Direct { buf, fill: 0, pos, spare: Some(spare), to_io: Some(to_io), from_io, io: Some(io), fd })
    }

    /// Appends `data`, handing each full buffer to the writing thread.
    ///
    /// # Errors
    /// The error of an earlier buffer's write.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = (DIRECT_BYTES - self.fill).min(data.len());
            let from = self.buf.1 + self.fill;
            self.buf.0[from..from + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == DIRECT_BYTES {
                let next = match self.spare.take() {
                    Some(b) => b,
                    None => self.written()?,
                };
                let full = std::mem::replace(&mut self.buf, next);
                let sent = self.to_io.as_ref().map(|t| t.send((full, self.pos)));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(io::Error::other("the direct writer stopped"));
                }
                self.pos += DIRECT_BYTES as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// Waits for the buffer in flight to be written; returns it.
    fn written(&mut self) -> io::Result<Aligned> {
        self.from_io.recv().map_err(|_| io::Error::other("the direct writer stopped"))?
    }

    /// Writes what is left once the buffer in flight is written: whole blocks directly, the tail
    /// through `file` (the same file, opened without O_DIRECT).
    ///
    /// # Errors
    /// The first write's error.
    pub fn finish(mut self, file: &File) -> io::Result<()> {
        if self.spare.is_none() {
            self.spare = Some(self.written()?);
        }
        // The thread ends once its channel is gone.
        self.to_io = None;
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
        let (b, at) = &self.buf;
        let blocks = self.fill / DIRECT_ALIGN * DIRECT_ALIGN;
        self.fd.write_all_at(&b[*at..at + blocks], self.pos)?;
        if self.fill > blocks {
            file.write_all_at(&b[at + blocks..at + self.fill], self.pos + blocks as u64)?;
        }
        Ok(())
    }
}

/// Fewest files stored between two background `syncfs` of a tree get.
pub const FLUSH_MIN_FILES: usize = 256;
/// A tree get is flushed in the background after each of this many parts of its files. Measured
/// (5,000 x 4 KiB, 6 alternated rounds): the final sync waited 52-73 ms with none, 16-24 ms
/// with 2, 10-26 ms with 3, 5-11 ms with 5; walls (median) 0.316 / 0.308 / 0.294 / 0.307 s: more
/// flushes cost more in total (each waits for a journal commit) while the get runs.
const FLUSH_PARTS: usize = 3;

/// When a tree get's next background `syncfs` is due.
#[derive(Debug)]
pub struct Every {
    step: usize,
    next: usize,
}

impl Every {
    /// For a get of `total` files: one flush after each [`FLUSH_PARTS`]th part of them, at least
    /// [`FLUSH_MIN_FILES`] apart (none for a tree smaller than that).
    pub fn new(total: usize) -> Every {
        let step = (total / FLUSH_PARTS).max(FLUSH_MIN_FILES);
        Every { step, next: step }
    }

    /// Whether a flush is due now that `stored` files landed (and the next one's threshold moves on).
    pub fn due(&mut self, stored: usize) -> bool {
        if stored < self.next {
            return false;
        }
        self.next = stored + self.step;
        true
    }
}

/// Background `syncfs` of a tree get's destination while the get goes on; one at a time, and
/// only when a `syncfs` is the cheaper way to sync (little dirty data of others on the system:
/// see `transfer::sync_local`, which still makes everything durable at the end).
#[derive(Debug)]
pub struct Flusher {
    dir: PathBuf,
    state: Mutex<(usize, Every)>,
    busy: Arc<AtomicBool>,
}

impl Flusher {
    /// For a get of `total` files under the local directory `dir`.
    pub fn new(dir: PathBuf, total: usize) -> Flusher {
        Flusher { dir, state: Mutex::new((0, Every::new(total))), busy: Arc::new(AtomicBool::new(false)) }
    }

    /// `files` more files landed; starts a background `syncfs` when one is due and none runs.
    pub fn stored(&self, files: usize) {
        let stored = {
            let Ok(mut state) = self.state.lock() else { return };
            state.0 += files;
            let stored = state.0;
            if self.busy.load(Ordering::Acquire) || !state.1.due(stored) {
                return;
            }
            stored
        };
        if !homefs_shared::sync_cost::syncfs_is_cheaper(stored, homefs_shared::sync_cost::dirty_bytes()) {
            tracing::debug!(stored, "get: background syncfs skipped (much else is dirty)");
            return;
        }
        self.busy.store(true, Ordering::Release);
        let (dir, busy) = (self.dir.clone(), self.busy.clone());
        let spawned = std::thread::Builder::new().name("netcp-flush".into()).spawn(move || {
            let started = std::time::Instant::now();
            let r = File::open(&dir).and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
            tracing::debug!(stored, elapsed = ?started.elapsed(), ok = r.is_ok(), "get: background syncfs");
            busy.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_step_and_from_where_the_file_starts() {
        let mut b = Behind::new(0, 10);
        assert_eq!(b.due(9), None);
        assert_eq!(b.due(10), Some((0, 10)));
        assert_eq!(b.due(19), None);
        assert_eq!(b.due(25), Some((10, 15)));
        assert_eq!(b.due(25), None);
        // A resumed file: the verified prefix is not started again.
        let mut r = Behind::new(100, 10);
        assert_eq!(r.due(105), None);
        assert_eq!(r.due(110), Some((100, 10)));
    }

    #[test]
    fn tree_flushes_after_each_part_and_not_for_small_trees() {
        let mut e = Every::new(6_000);
        assert!(!e.due(1_999));
        assert!(e.due(2_000));
        assert!(!e.due(3_999));
        assert!(e.due(4_050));
        assert!(!e.due(6_049));
        assert!(e.due(6_050));
        let mut small = Every::new(100);
        assert!(!small.due(100));
        let mut mid = Every::new(600);
        assert!(!mid.due(255));
        assert!(mid.due(256));
        assert!(!mid.due(511));
        assert!(mid.due(512));
    }

    #[test]
    fn flusher_syncs_in_the_background_once_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Flusher::new(dir.path().to_path_buf(), 1_000);
        f.stored(100);
        assert!(!f.busy.load(Ordering::Acquire), "not due after 100 of 1,000 files");
        f.stored(200);
        // Due (256): a syncfs started (unless much is dirty on this machine), and it ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while f.busy.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "waited 30 s for the background syncfs to end");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(f.state.lock().expect("lock").0, 300);
    }

    #[test]
    fn direct_writes_land_whole_with_an_unaligned_tail() {
        use std::io::Read;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        // A resumed prefix of one block, then pieces of odd sizes, ending mid-block.
        let data: Vec<u8> = (0..(9 << 20) + 1234).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &data[..DIRECT_ALIGN]).expect("prefix");
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        let Some(mut d) = Direct::open(&path, DIRECT_ALIGN as u64) else {
            eprintln!("skipped: the temp dir's file system refuses O_DIRECT");
            return;
        };
        assert!(Direct::open(&path, 100).is_none(), "an unaligned start is written through the page cache");
        for piece in data[DIRECT_ALIGN..].chunks(300_001) {
            d.write(piece).expect("write");
        }
        d.finish(&file).expect("finish");
        drop(file);
        let mut back = Vec::new();
        File::open(&path).expect("open").read_to_end(&mut back).expect("read");
        assert!(back == data, "the file reads back as written ({} of {} bytes)", back.len(), data.len());
    }

    #[test]
    fn started_writeback_leaves_the_bytes_in_place() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::create(&path).expect("create");
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let mut b = Behind::new(0, 1 << 20);
        let mut started = 0;
        for chunk in data.chunks(256 << 10) {
            f.write_all(chunk).expect("write");
            let written = f.metadata().expect("stat").len();
            if let Some((off, len)) = b.due(written) {
                start(&f, off, len);
                started += len;
            }
        }
        assert_eq!(started, 3 << 20);
        start(&f, 0, 0);
        drop(f);
        let mut back = Vec::new();
        File::open(&path).expect("open").read_to_end(&mut back).expect("read");
        assert!(back == data, "the file reads back as written");
    }
}
