//! Small reads through netmount's fast path (sent by the FUSE thread, answered by the connection's
//! reader: `mount/src/fuse/reads.rs`): right bytes at random offsets, cold; reads racing a
//! truncate on the server; reads across a server restart; and a read the server cannot answer
//! fails with EIO, never as end of file.

use homefs_tests::mount::{fuse_available, output_within, TestMount, PASSWORD};
use homefs_tests::server::TestServer;
use rand::{Rng, SeedableRng};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

/// The test file's content: a pattern that differs at every block and offset.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i / BLOCK) as u8).wrapping_mul(31) ^ (i as u8) ^ seed).collect()
}

/// Opens `path` with O_DIRECT: every read goes to netmount (no page cache in between).
fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// Reads `BLOCK` bytes at `offset`, looping on short reads until the end of the file.
fn read_block(f: &File, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK];
    let mut done = 0;
    while done < BLOCK {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

fn started(name: &str) -> Option<TestServer> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    Some(server)
}

/// Writes `data` as alice's `name` on the server's disk (not through a mount), synced so that
/// [`drop_server_cache`] can drop its pages.
fn put_on_server(server: &TestServer, name: &str, data: &[u8]) -> PathBuf {
    let path = server.home_path("alice").join(name);
    let mut f = File::create(&path).expect("create on the server");
    f.write_all(data).expect("write on the server");
    f.sync_all().expect("sync on the server");
    path
}

/// Drops the server file's pages from the page cache (`posix_fadvise(DONTNEED)`, through
/// python: no `unsafe` here), so that fsd's reads miss the cache and take the path that waits for
/// the disk (on a file system that keeps pages only in memory, tmpfs, nothing is dropped and the
/// cached path answers instead).
fn drop_server_cache(path: &Path) {
    let script =
        "import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\nos.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n";
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).arg(path);
    let out = output_within(cmd, Duration::from_secs(30), "posix_fadvise DONTNEED");
    assert!(out.status.success(), "fadvise: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn mount_random_small_reads_return_the_files_bytes() {
    let Some(server) = started("mount_random_small_reads_return_the_files_bytes") else { return };
    let data = pattern(8 << 20, 7);
    let on_disk = put_on_server(&server, "big", &data);
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let f = open_direct(&m.join("big"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for round in 0..3 {
        // Rounds 0 and 2 miss fsd's page cache (the server reads from the disk), round 1 hits it.
        if round != 1 {
            drop_server_cache(&on_disk);
        }
        for _ in 0..300 {
            // Any offset, aligned or not, some crossing the end of the file.
            let offset = rng.random_range(0..data.len() as u64 + 2 * BLOCK as u64);
            let got = read_block(&f, offset).unwrap_or_else(|e| panic!("read at {offset} (round {round}): {e}"));
            let start = (offset as usize).min(data.len());
            let want = &data[start..(start + BLOCK).min(data.len())];
            assert!(got == want, "bytes at {offset} (round {round}): {} bytes, want {}", got.len(), want.len());
        }
    }
}

/// The server's file shrinks and grows again while small reads run: each read returns the old
/// bytes, zeros (the file grew back) or nothing (end of file), never an error, a mix of the two
/// contents or a hang.
#[test]
fn mount_small_reads_racing_a_truncate_on_the_server() {
    let Some(server) = started("mount_small_reads_racing_a_truncate_on_the_server") else { return };
    let data = pattern(1 << 20, 3);
    let on_disk = put_on_server(&server, "t", &data);
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let f = open_direct(&m.join("t"));
    let stop = Arc::new(AtomicBool::new(false));
    let truncating = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&on_disk).expect("open on the server");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.set_len(512 << 10).expect("shrink");
                f.set_len(1 << 20).expect("grow");
                n += 1;
            }
            n
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut reads, mut kinds) = (0u64, [0u64; 3]);
    while Instant::now() < deadline {
        let block = rng.random_range(128..256u64);
        let offset = block * BLOCK as u64;
        let got = read_block(&f, offset).unwrap_or_else(|e| panic!("read at {offset} while truncating: {e}"));
        let old = &data[offset as usize..offset as usize + BLOCK];
        let kind = if got.is_empty() {
            0
        } else if got == old {
            1
        } else if got.iter().all(|b| *b == 0) {
            2
        } else {
            panic!("read at {offset}: {} bytes that are neither the file's nor zeros", got.len())
        };
        kinds[kind] += 1;
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let cycles = truncating.join().expect("truncating thread");
    assert!(cycles > 0 && reads > 50, "{reads} reads against {cycles} truncate cycles");
    eprintln!(
        "reads: {reads} (end of file {}, old bytes {}, zeros {}), truncate cycles {cycles}",
        kinds[0], kinds[1], kinds[2]
    );
}

/// Reads keep working across a server restart (the handle is reopened on the new connection),
/// and while the server is down past the reconnect timeout a read fails with EIO: never a short
/// read or end of file.
#[test]
fn mount_small_reads_across_a_restart_and_eio_when_the_server_is_gone() {
    let name = "mount_small_reads_across_a_restart_and_eio_when_the_server_is_gone";
    let Some(mut server) = started(name) else { return };
    let data = pattern(2 << 20, 11);
    let on_disk = put_on_server(&server, "r", &data);
    drop_server_cache(&on_disk);
    let m = TestMount::new(&server, "alice", PASSWORD, "reconnect_timeout=3");
    let f = open_direct(&m.join("r"));
    let check = |f: &File, offset: u64, what: &str| {
        let got = read_block(f, offset).unwrap_or_else(|e| panic!("read at {offset} {what}: {e}"));
        assert!(got == data[offset as usize..offset as usize + BLOCK], "bytes at {offset} {what}");
    };
    for b in 0..16u64 {
        check(&f, b * 7 * BLOCK as u64, "before the restart");
    }
    // Reads running while the server goes away and comes back: each is right or fails with EIO.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, data, f) = (stop.clone(), data.clone(), f.try_clone().expect("dup"));
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(2);
            let (mut ok, mut eio) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let offset = rng.random_range(0..(data.len() / BLOCK) as u64) * BLOCK as u64;
                match read_block(&f, offset) {
                    Ok(got) => {
                        assert!(
                            got == data[offset as usize..offset as usize + BLOCK],
                            "bytes at {offset} during restart"
                        );
                        ok += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
                    Err(e) => panic!("read at {offset} during a restart: {e} (want the bytes or EIO)"),
                }
            }
            (ok, eio)
        })
    };
    server.restart();
    let after = Instant::now() + Duration::from_secs(20);
    // The reconnect: a read after it gets the bytes again (bounded by the reconnect timeout).
    loop {
        match read_block(&f, 5 * BLOCK as u64) {
            Ok(got) if got == data[5 * BLOCK..6 * BLOCK] => break,
            Ok(got) => panic!("after the restart: {} wrong bytes", got.len()),
            Err(e) => assert!(Instant::now() < after, "no read succeeded within 20 s of the restart: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, eio) = reader.join().expect("reader thread");
    assert!(ok > 0, "reads during the restart: {ok} ok, {eio} EIO");
    for b in 0..16u64 {
        check(&f, (b * 11 + 3) * BLOCK as u64, "after the restart");
    }
    // Gone for good: a read that is not cached fails with EIO within the reconnect timeout.
    server.stop();
    let t0 = Instant::now();
    let err = read_block(&f, 9 * BLOCK as u64).expect_err("a read with the server gone");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "a read with the server gone: {err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "EIO took {:?}", t0.elapsed());
}
