//! The round-trip savings of netmount and what they must not change: `WriteAttr` (a write that
//! answers with the attributes), names in a directory just created answered absent from the
//! cache, directory times kept locally after a create or unlink, and `release` answered before
//! its `Close` is sent.

use bytes::Bytes;
use homefs_shared::{ErrorCode, OpenFlags};
use homefs_tests::mount::{fuse_available, mounted_alice, wait_until, TestMount, PASSWORD};
use homefs_tests::{wp, TestServer};
use std::fs;
use std::time::Duration;

fn create() -> OpenFlags {
    OpenFlags { read: true, write: true, create: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_attr_answers_the_attributes_after_the_write() {
    let server = TestServer::start("write_attr_answers_the_attributes_after_the_write");
    server.add_user("alice", "pw", Some("1M"));
    let c = server.connect("alice", "pw").await;
    let (fh, attr) = c.open(&wp("f"), create(), 0o640).await.expect("create");
    assert_eq!(attr.size, 0);
    let after = c.write_attr(fh, 10, Bytes::from(vec![7u8; 4096])).await.expect("write_attr");
    let stat = c.stat(&wp("f")).await.expect("stat");
    assert_eq!(after.size, 4106, "size after a write at 10 of 4096 bytes");
    assert_eq!((after.ino, after.size, after.mtime, after.perm), (stat.ino, stat.size, stat.mtime, stat.perm));
    // Errors are those of Write: over the quota, nothing is written and the size stays.
    let e = c.write_attr(fh, 0, Bytes::from(vec![1u8; 2 << 20])).await.expect_err("over quota");
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    assert_eq!(c.stat(&wp("f")).await.expect("stat").size, 4106);
    c.close(fh).await.expect("close");
    let counts = c.request_counts();
    assert!(counts.contains(&("write_attr", 2)), "write_attr counted: {counts:?}");
}

#[test]
fn mount_fresh_directory_names_and_times_stay_right() {
    let Some((_server, m)) = mounted_alice("mount_fresh_directory_names_and_times_stay_right", None) else { return };
    // All within one TTL of the mkdir, while the directory is known complete: every name added,
    // renamed or removed through the mount is seen as it is.
    let out = m.sh_ok(
        "mkdir d && cd d && echo one > a && mv a b && ln b c && ln -s b s && mkdir e && touch e/x && \
         rm c && printf '%s ' * && test ! -e a && test ! -e c && test -L s && cat s && stat -c %s b",
    );
    assert_eq!(out, "b e s one\n4\n");
    // A create moves the directory's mtime (kept locally until the TTL, never backwards).
    let before = fs::metadata(m.join("d")).expect("stat d").modified().expect("mtime");
    // The create below must happen at a later clock tick than `before`: wait (bounded) for one.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::SystemTime::now() <= before {
        assert!(std::time::Instant::now() < deadline, "the clock did not move past {before:?}");
        std::hint::spin_loop();
    }
    fs::write(m.join("d/new"), b"x").expect("create d/new");
    let after = fs::metadata(m.join("d")).expect("stat d").modified().expect("mtime");
    assert!(after > before, "directory mtime moved on create: {before:?} -> {after:?}");
    // The size after writes is the server's, without a stat in between.
    fs::write(m.join("d/big"), vec![5u8; 300_000]).expect("write d/big");
    assert_eq!(fs::metadata(m.join("d/big")).expect("stat").len(), 300_000);
}

#[test]
fn mount_another_mounts_file_in_our_new_directory_appears_within_the_ttl() {
    let name = "mount_another_mounts_file_in_our_new_directory_appears_within_the_ttl";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    let a = TestMount::new(&server, "alice", PASSWORD, "");
    let b = TestMount::new(&server, "alice", PASSWORD, "");
    a.sh_ok("mkdir shared");
    b.sh_ok("echo from-b > shared/f");
    // A's cache may call it absent for at most one TTL (1 s by default), as for any negative entry.
    wait_until(Duration::from_secs(10), "mount A to see shared/f made by mount B", || a.join("shared/f").exists());
    assert_eq!(a.sh_ok("cat shared/f"), "from-b\n");
}

#[test]
fn mount_close_without_locks_is_answered_at_once_and_files_still_close() {
    let Some((_server, m)) = mounted_alice("mount_close_without_locks_is_answered_at_once_and_files_still_close", None)
    else {
        return;
    };
    // Many files opened and closed: each release is answered before its Close goes out, and the
    // server still closes every one (or its per-session open-file limit would refuse opens).
    m.sh_ok("mkdir many && cd many && for i in $(seq 1 3000); do echo $i > f$i; done");
    assert_eq!(m.sh_ok("cat many/f2999"), "2999\n");
    // Locks still go before release is answered: another flock right after the holder exits wins.
    m.sh_ok("touch l && flock l -c true && flock -n l -c true");
}

#[test]
fn mount_queued_write_errors_surface_on_write_close_or_fsync() {
    let Some((_server, m)) = mounted_alice("mount_queued_write_errors_surface_on_write_close_or_fsync", Some("1M"))
    else {
        return;
    };
    // 64 KiB writes past a 1 MiB quota: each write is answered once queued, so the quota error
    // comes back on a later write or on close; it must come back, and Python must see it.
    let script = "import sys\n\
        try:\n\
        \x20   f = open('big', 'wb', buffering=0)\n\
        \x20   for _ in range(40):\n\
        \x20       f.write(b'x' * 65536)\n\
        \x20   f.close()\n\
        except OSError as e:\n\
        \x20   print('error', e.errno)\n\
        \x20   sys.exit(0)\n\
        print('no error')\n";
    fs::write(m.join("w.py"), script).expect("write the script");
    let out = m.sh_ok("python3 w.py");
    assert_eq!(out, format!("error {}\n", libc::EDQUOT), "the quota error surfaced");
    // The same through fsync: written within the quota, then past it, then fsync.
    let script = "import os, sys\n\
        fd = os.open('big2', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n\
        try:\n\
        \x20   for i in range(40):\n\
        \x20       os.pwrite(fd, b'y' * 65536, i * 65536)\n\
        \x20   os.fsync(fd)\n\
        except OSError as e:\n\
        \x20   print('error', e.errno)\n\
        \x20   sys.exit(0)\n\
        print('no error')\n";
    fs::write(m.join("w2.py"), script).expect("write the script");
    let out = m.sh_ok("rm -f big && python3 w2.py");
    assert_eq!(out, format!("error {}\n", libc::EDQUOT), "the quota error surfaced");
    // Data written within the quota reads back whole after close (writes settled first).
    m.sh_ok("rm -f big2 && head -c 300000 /dev/urandom > src && cp src dst && cmp src dst");
}
