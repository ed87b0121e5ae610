//! Which way of making many files durable is cheaper here: one `syncfs` of their file system, or
//! an fsync of each. Both ends decide it the same way (fsd for a netcp put's `Sync`, netcp for
//! what a get wrote), from the dirty data the kernel reports.
//!
//! Measured on this project's VM (ext4, virtio disk): a `syncfs` with little dirty costs ~4 ms
//! after 300 files of 4 KiB were stored (34-83 ms after 5,000: the writeback of the files
//! themselves, which an fsync per file pays too); beyond that it waits for everything dirty on the
//! file system, other processes' data included: 1 GiB written by another process (`dd`, not
//! synced) made it 287-414 ms, whatever the number of our files. An fsync per path (writeback of
//! all of them started first) costs ~66 us each (each ends in a disk cache flush): 300 files
//! 19-34 ms, 5,000 files 330-450 ms, with or without that 1 GiB.

use std::time::Duration;

/// The fixed cost of one `syncfs` of a file system with little dirty.
pub const SYNCFS_BASE: Duration = Duration::from_millis(4);
/// How fast a `syncfs` writes other processes' dirty data back (1 GiB added ~300 ms).
pub const WRITEBACK_BYTES_PER_SEC: u64 = 3 << 30;
/// What one fsync costs (it ends in a disk cache flush).
pub const FSYNC_EACH: Duration = Duration::from_micros(66);

/// Bytes waiting for writeback, system-wide (`Dirty` + `Writeback` of `/proc/meminfo`; `None`
/// when it cannot be read).
pub fn dirty_bytes() -> Option<u64> {
    parse_dirty(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_dirty(meminfo: &str) -> Option<u64> {
    let mut total = 0;
    for line in meminfo.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        if key == "Dirty" || key == "Writeback" {
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            total += kib * 1024;
        }
    }
    Some(total)
}

/// Whether one `syncfs` is expected to be cheaper than `fsyncs` fsyncs, with `dirty` bytes dirty
/// (system-wide: an over-estimate for one file system, which leans toward the fsyncs, whose cost
/// is ours alone). Unknown counts as nothing else dirty: a `syncfs` from ~60 paths on.
pub fn syncfs_is_cheaper(fsyncs: usize, dirty: Option<u64>) -> bool {
    let flush = Duration::from_secs_f64(dirty.unwrap_or(0) as f64 / WRITEBACK_BYTES_PER_SEC as f64);
    SYNCFS_BASE + flush < FSYNC_EACH * u32::try_from(fsyncs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncfs_only_when_cheaper() {
        assert!(syncfs_is_cheaper(300, Some(0)));
        assert!(!syncfs_is_cheaper(30, Some(0)));
        assert!(!syncfs_is_cheaper(2, Some(0)));
        // 1 GiB dirty elsewhere: ~330 ms of writeback > 300 fsyncs (~20 ms).
        assert!(!syncfs_is_cheaper(300, Some(1 << 30)));
        assert!(!syncfs_is_cheaper(5_000, Some(4 << 30)));
        assert!(syncfs_is_cheaper(5_050, Some(50 << 20)));
        assert!(syncfs_is_cheaper(5_000, None));
        assert!(!syncfs_is_cheaper(30, None));
    }

    #[test]
    fn dirty_is_dirty_plus_writeback() {
        let meminfo = "MemTotal:       24000000 kB\nDirty:              1024 kB\nWriteback:           512 kB\nWritebackTmp:          0 kB\n";
        assert_eq!(parse_dirty(meminfo), Some(1536 * 1024));
        assert_eq!(parse_dirty("Dirty: lots\n"), None);
    }
}
