//! Every file operation through the client against the real server: results, errors, attributes,
//! non-UTF-8 names, a directory of 10,000 entries, range copy, checksums and locks.

use bytes::Bytes;
use homefs_shared::{
    ErrorCode, FileKind, LockKind, LockSpec, OpenFlags, RenameFlags, SetAttr, SetTime, Timestamp, WirePath,
};
use homefs_tests::{hash, wp, TestServer};
use std::os::unix::ffi::OsStrExt as _;
use std::time::Duration;

fn create() -> OpenFlags {
    OpenFlags { read: true, write: true, create: true, ..Default::default() }
}

fn rw() -> OpenFlags {
    OpenFlags { read: true, write: true, ..Default::default() }
}

/// Deterministic content of `len` bytes.
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn put(c: &homefs_mount::client::Client, path: &WirePath, data: &[u8]) {
    let (fh, _) = c.open(path, OpenFlags { truncate: true, ..create() }, 0o644).await.expect("create");
    c.write(fh, 0, Bytes::copy_from_slice(data)).await.expect("write");
    c.close(fh).await.expect("close");
}

async fn get(c: &homefs_mount::client::Client, path: &WirePath) -> Vec<u8> {
    let (fh, attr) = c.open(path, OpenFlags { read: true, ..Default::default() }, 0).await.expect("open");
    let (data, size) = c.read(fh, 0, attr.size as u32 + 1).await.expect("read");
    assert_eq!(size, attr.size);
    c.close(fh).await.expect("close");
    data.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_dirs_links_and_attributes() {
    let server = TestServer::start("files_dirs_links_and_attributes");
    server.add_user("alice", "pw", Some("100M"));
    let c = server.connect("alice", "pw").await;

    let d = c.mkdir(&wp("d"), 0o755).await.expect("mkdir");
    assert_eq!(d.kind, FileKind::Dir);
    assert_eq!(c.mkdir(&wp("d"), 0o755).await.expect_err("mkdir twice").code, ErrorCode::Exists);
    assert_eq!(c.stat(&wp("missing")).await.expect_err("stat missing").code, ErrorCode::NotFound);

    // Open, write, read; sizes; reads past the end; a large write split in several requests.
    let data = content(1, 10 << 20);
    let (fh, attr) = c.open(&wp("d/f"), create(), 0o644).await.expect("create");
    assert_eq!((attr.kind, attr.size), (FileKind::File, 0));
    assert_eq!(c.write(fh, 0, Bytes::from(data.clone())).await.expect("write 10 MiB"), 10 << 20);
    let (back, size) = c.read(fh, 0, 10 << 20).await.expect("read 10 MiB");
    assert_eq!((size, hash(&back)), (10 << 20, hash(&data)));
    let (tail, _) = c.read(fh, (10 << 20) - 5, 100).await.expect("read at the end");
    assert_eq!(&tail[..], &data[data.len() - 5..]);
    assert!(c.read(fh, 20 << 20, 10).await.expect("read past the end").0.is_empty());
    c.fsync(fh, false).await.expect("fsync");
    c.fsync(fh, true).await.expect("fdatasync");

    // Truncate through the handle and through the path; mode and times.
    assert_eq!(
        c.setattr(&wp("d/f"), Some(fh), SetAttr { size: Some(100), ..Default::default() })
            .await
            .expect("ftruncate")
            .size,
        100
    );
    assert_eq!(
        c.setattr(&wp("d/f"), None, SetAttr { size: Some(50), ..Default::default() }).await.expect("truncate").size,
        50
    );
    c.close(fh).await.expect("close");
    assert_eq!(c.close(fh).await.expect_err("close twice").code, ErrorCode::BadHandle);
    assert_eq!(get(&c, &wp("d/f")).await, &data[..50]);
    let a = c.setattr(&wp("d/f"), None, SetAttr { mode: Some(0o600), ..Default::default() }).await.expect("chmod");
    assert_eq!(a.perm, 0o600);
    let t = Timestamp { secs: 1_000_000_000, nanos: 123_000_000 };
    let set = SetAttr { atime: Some(SetTime::At(t)), mtime: Some(SetTime::At(t)), ..Default::default() };
    c.setattr(&wp("d/f"), None, set).await.expect("utimens");
    let st = c.stat(&wp("d/f")).await.expect("stat");
    assert_eq!((st.perm, st.mtime, st.atime), (0o600, t, t));
    let now = SetAttr { mtime: Some(SetTime::Now), ..Default::default() };
    assert!(c.setattr(&wp("d/f"), None, now).await.expect("touch").mtime > t);

    // Append mode writes at the end whatever the offset.
    let (fh, _) =
        c.open(&wp("d/f"), OpenFlags { write: true, append: true, ..Default::default() }, 0).await.expect("append");
    assert_eq!(c.write(fh, 0, Bytes::from_static(b"tail")).await.expect("append write"), 54);
    c.close(fh).await.expect("close");
    // Exclusive create of an existing file.
    let excl = OpenFlags { exclusive: true, ..create() };
    assert_eq!(c.open(&wp("d/f"), excl, 0o644).await.expect_err("O_EXCL").code, ErrorCode::Exists);
    assert_eq!(c.open(&wp("d"), rw(), 0).await.expect_err("open a dir for write").code, ErrorCode::IsDir);

    // Symlinks and hard links.
    let l = c.symlink(b"d/f", &wp("link")).await.expect("symlink");
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(c.readlink(&wp("link")).await.expect("readlink"), b"d/f");
    assert_eq!(c.stat(&wp("link")).await.expect("lstat").kind, FileKind::Symlink);
    assert_eq!(get(&c, &wp("link")).await.len(), 54, "open follows a symlink inside the home");
    let h = c.link(&wp("d/f"), &wp("hard")).await.expect("link");
    assert_eq!(h.nlink, 2);
    assert_eq!(c.stat(&wp("d/f")).await.expect("stat").ino, h.ino);

    // rmdir of a non-empty directory; unlink; rmdir.
    assert_eq!(c.rmdir(&wp("d")).await.expect_err("rmdir non-empty").code, ErrorCode::NotEmpty);
    c.unlink(&wp("d/f")).await.expect("unlink");
    assert_eq!(c.stat(&wp("hard")).await.expect("the other link lives").nlink, 1);
    c.rmdir(&wp("d")).await.expect("rmdir");
    assert_eq!(c.stat(&wp("d")).await.expect_err("gone").code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_flags_and_open_handles_follow() {
    let server = TestServer::start("rename_flags_and_open_handles_follow");
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    put(&c, &wp("a"), b"AAA").await;
    put(&c, &wp("b"), b"BB").await;

    let noreplace = RenameFlags { noreplace: true, exchange: false };
    assert_eq!(c.rename(&wp("a"), &wp("b"), noreplace).await.expect_err("noreplace").code, ErrorCode::Exists);
    c.rename(&wp("a"), &wp("c"), noreplace).await.expect("noreplace to a free name");
    let exchange = RenameFlags { noreplace: false, exchange: true };
    c.rename(&wp("c"), &wp("b"), exchange).await.expect("exchange");
    assert_eq!((get(&c, &wp("b")).await, get(&c, &wp("c")).await), (b"AAA".to_vec(), b"BB".to_vec()));
    c.rename(&wp("c"), &wp("b"), RenameFlags::default()).await.expect("replace");
    assert_eq!(get(&c, &wp("b")).await, b"BB");
    assert_eq!(c.stat(&wp("c")).await.expect_err("moved").code, ErrorCode::NotFound);

    // An open file renamed (through its directory) keeps working after a reconnect: the client
    // reopens it by its new path.
    c.mkdir(&wp("dir"), 0o755).await.expect("mkdir");
    let (fh, _) = c.open(&wp("dir/f"), create(), 0o644).await.expect("create");
    c.write(fh, 0, Bytes::from_static(b"one")).await.expect("write");
    c.rename(&wp("dir"), &wp("moved"), RenameFlags::default()).await.expect("rename dir");
    c.break_connection();
    c.write(fh, 3, Bytes::from_static(b"two")).await.expect("write after reconnect");
    assert_eq!(&c.read(fh, 0, 100).await.expect("read").0[..], b"onetwo");
    c.close(fh).await.expect("close");
    assert_eq!(c.open_handles(), 0);
    assert_eq!(get(&c, &wp("moved/f")).await, b"onetwo");

    // A handle whose file is gone after a reconnect is stale.
    let (fh, _) = c.open(&wp("moved/f"), rw(), 0).await.expect("open");
    c.unlink(&wp("moved/f")).await.expect("unlink");
    c.break_connection();
    assert_eq!(c.read(fh, 0, 10).await.expect_err("stale").code, ErrorCode::Stale);
    c.close(fh).await.expect("close a stale handle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_names_round_trip() {
    let server = TestServer::start("non_utf8_names_round_trip");
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    let name: &[u8] = b"caf\xe9-\xff\xfe";
    let dir: &[u8] = b"d\x80ir";
    c.mkdir(&wp(dir), 0o755).await.expect("mkdir non-UTF-8");
    let path = wp([dir, b"/", name].concat());
    put(&c, &path, b"bytes").await;
    let entries = c.read_dir(&wp(dir)).await.expect("readdir");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, name);
    assert_eq!(entries[0].attr.size, 5);
    // The same bytes on the server's disk.
    let on_disk =
        server.home_path("alice").join(std::ffi::OsStr::from_bytes(dir)).join(std::ffi::OsStr::from_bytes(name));
    assert_eq!(std::fs::read(&on_disk).expect("file on disk under its exact name"), b"bytes");
    let renamed = wp([dir, b"/\xc3\x28"].concat());
    c.rename(&path, &renamed, RenameFlags::default()).await.expect("rename");
    assert_eq!(get(&c, &renamed).await, b"bytes");
    c.symlink(name, &wp(b"l\xff")).await.expect("symlink");
    assert_eq!(c.readlink(&wp(b"l\xff")).await.expect("readlink"), name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_of_ten_thousand_entries() {
    let server = TestServer::start("directory_of_ten_thousand_entries");
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    c.mkdir(&wp("big"), 0o755).await.expect("mkdir");
    // Made on the server's disk directly: this test is about listing them.
    let dir = server.home_path("alice").join("big");
    let mut names: Vec<Vec<u8>> =
        (0..10_000).map(|i| format!("entry-{i:05}-{}", i * 7919 % 10_007).into_bytes()).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(n)), vec![b'x'; i % 7]).expect("create entry");
    }
    names.sort();
    let all = c.read_dir(&wp("big")).await.expect("readdir");
    assert_eq!(all.len(), 10_000);
    assert_eq!(all.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), names, "every name, sorted bytewise");
    for e in &all {
        let i: usize = std::str::from_utf8(&e.name[6..11]).expect("ascii").parse().expect("number");
        assert_eq!((e.attr.kind, e.attr.size), (FileKind::File, (i % 7) as u64));
    }
    // Small pages give the same listing.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = c.read_dir_page(&wp("big"), after.clone(), 777).await.expect("page");
        assert!(page.len() <= 777);
        after = page.last().map(|e| e.name.clone());
        paged.extend(page.into_iter().map(|e| e.name));
        if !more {
            break;
        }
    }
    assert_eq!(paged, names);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statfs_copy_range_and_checksum() {
    let server = TestServer::start("statfs_copy_range_and_checksum");
    server.add_user("alice", "pw", Some("64M"));
    let c = server.connect("alice", "pw").await;
    let st = c.statfs().await.expect("statfs");
    assert_eq!((st.total_bytes, st.used_bytes), (64 << 20, 0));
    assert!(st.free_bytes <= 64 << 20);

    let data = content(7, (5 << 20) + 123);
    put(&c, &wp("src"), &data).await;
    assert_eq!(c.statfs().await.expect("statfs").used_bytes, data.len() as u64);

    // Checksums of the whole file and of ranges, against a local BLAKE3.
    let (h, len, size, _) = c.checksum(&wp("src"), 0, u64::MAX).await.expect("checksum");
    assert_eq!((h, len, size), (hash(&data), data.len() as u64, data.len() as u64));
    let (h, len, _, _) = c.checksum(&wp("src"), 1000, 3 << 20).await.expect("range checksum");
    assert_eq!((h, len), (hash(&data[1000..3 << 20]), (3 << 20) - 1000));
    let (h, len, _, _) = c.checksum(&wp("src"), 5 << 20, 10 << 20).await.expect("cut at the end");
    assert_eq!((h, len), (hash(&data[5 << 20..]), 123));

    // Server-side copy, whole and into the middle.
    let (src, _) = c.open(&wp("src"), OpenFlags { read: true, ..Default::default() }, 0).await.expect("open src");
    let (dst, _) = c.open(&wp("dst"), create(), 0o644).await.expect("create dst");
    let mut copied = 0;
    while copied < data.len() as u64 {
        let n = c.copy_range(src, copied, dst, copied, data.len() as u64 - copied).await.expect("copy_range");
        assert!(n > 0, "copy_range made no progress");
        copied += n;
    }
    assert_eq!(c.copy_range(src, 10, dst, 100, 50).await.expect("copy into the middle"), 50);
    c.close(src).await.expect("close");
    c.close(dst).await.expect("close");
    let mut expect = data.clone();
    expect.copy_within(10..60, 100);
    assert_eq!(hash(&get(&c, &wp("dst")).await), hash(&expect));
    assert_eq!(c.statfs().await.expect("statfs").used_bytes, 2 * data.len() as u64);
}

fn spec(kind: LockKind, start: u64, end: u64, owner: u64, flock: bool) -> LockSpec {
    LockSpec { kind, start, end, owner, pid: 4242, flock }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_between_two_clients() {
    let server = TestServer::start("locks_between_two_clients");
    server.add_user("alice", "pw", None);
    let c1 = server.connect("alice", "pw").await;
    let c2 = server.connect("alice", "pw").await;
    put(&c1, &wp("db"), b"0123456789").await;
    let (f1, _) = c1.open(&wp("db"), rw(), 0).await.expect("open 1");
    let (f2, _) = c2.open(&wp("db"), rw(), 0).await.expect("open 2");

    // Byte ranges: a write lock excludes a read lock of another client on an overlapping range.
    c1.lock(f1, spec(LockKind::Write, 0, 99, 1, false), false).await.expect("write lock");
    let e = c2.lock(f2, spec(LockKind::Read, 50, 60, 1, false), false).await.expect_err("conflict");
    assert_eq!(e.code, ErrorCode::WouldBlock);
    let conflict = c2.test_lock(f2, spec(LockKind::Read, 50, 60, 1, false)).await.expect("test lock");
    assert_eq!(conflict.map(|l| (l.kind, l.pid)), Some((LockKind::Write, 4242)));
    c2.lock(f2, spec(LockKind::Read, 100, 200, 1, false), false).await.expect("a range beside it");
    // Read locks share.
    c1.lock(f1, spec(LockKind::Read, 150, 160, 1, false), false).await.expect("read/read");

    // A waiting lock is granted once the holder unlocks.
    let waiter = {
        let c2 = c2.clone();
        tokio::spawn(async move {
            loop {
                match c2.lock(f2, spec(LockKind::Write, 0, 10, 1, false), true).await {
                    Err(e) if e.code == ErrorCode::WouldBlock => continue,
                    other => return other,
                }
            }
        })
    };
    assert!(
        c1.test_lock(f1, spec(LockKind::Write, 0, 10, 1, false)).await.expect("test").is_none(),
        "own locks never conflict"
    );
    c1.lock(f1, spec(LockKind::Unlock, 0, u64::MAX, 1, false), false).await.expect("unlock");
    tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter was not granted within 30 s of the unlock")
        .expect("task")
        .expect("lock after wait");

    // flock: whole-file, exclusive against the other client's open file.
    let (g1, _) = c1.open(&wp("db"), rw(), 0).await.expect("open");
    let (g2, _) = c2.open(&wp("db"), rw(), 0).await.expect("open");
    c1.lock(g1, spec(LockKind::Write, 0, u64::MAX, 1, true), false).await.expect("flock");
    let e = c2.lock(g2, spec(LockKind::Write, 0, u64::MAX, 1, true), false).await.expect_err("flock conflict");
    assert_eq!(e.code, ErrorCode::WouldBlock);
    // Closing releases the flock.
    c1.close(g1).await.expect("close");
    c2.lock(g2, spec(LockKind::Read, 0, u64::MAX, 1, true), false).await.expect("flock after close");

    // A client that goes away releases its locks.
    drop(c2);
    let e = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match c1.lock(f1, spec(LockKind::Write, 0, 10, 1, false), false).await {
                Err(e) if e.code == ErrorCode::WouldBlock => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    })
    .await
    .expect("the locks of a closed session were not released within 30 s");
    e.expect("lock after the other session ended");
}
