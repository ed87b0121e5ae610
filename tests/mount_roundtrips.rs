//! The round-trip savings of netmount and what they must not change: `WriteAttr` (a write that
//! answers with the attributes), names in a directory just created answered absent from the
//! cache, directory times kept locally after a create or unlink, `release` answered before its
//! `Close` is sent, and the metadata cache counted in round trips (a second `find`, `rm -rf`,
//! creates).

use bytes::Bytes;
use homefs_shared::{ErrorCode, OpenFlags};
use homefs_tests::mount::{alice_twice, delta, fuse_available, mounted_alice, wait_until, LoggedMount, PASSWORD};
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
    let Some((_server, a, b)) = alice_twice(name) else { return };
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

/// Makes the kernel forget its dentries and inodes (`drop_caches` = 2, as the benchmark does
/// before a cold run); `false` when this process may not (not root).
/// A server with alice (after `prepare` ran on it) and a logged mount of her home; `None` (the
/// test skips, saying why) without FUSE.
fn logged_alice(name: &str, prepare: impl FnOnce(&TestServer)) -> Option<(TestServer, LoggedMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    prepare(&server);
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    Some((server, m))
}

fn kernel_forgets() -> bool {
    fs::write("/proc/sys/vm/drop_caches", "2").is_ok()
}

/// A tree written on the server's disk, unknown to the mount: `dirs` directories of `files` files.
fn tree_on_server(server: &TestServer, dirs: usize, files: usize) {
    let top = server.home_path("alice").join("tree");
    for d in 0..dirs {
        let dir = top.join(format!("d{d}"));
        fs::create_dir_all(&dir).expect("make a directory on the server's disk");
        for f in 0..files {
            fs::write(dir.join(format!("f{f}")), b"x").expect("write a file on the server's disk");
        }
    }
}

#[test]
fn mount_a_second_find_costs_no_round_trip_even_after_the_kernel_forgot() {
    let Some((_server, m)) =
        logged_alice("mount_a_second_find_costs_no_round_trip_even_after_the_kernel_forgot", |s| {
            tree_on_server(s, 5, 20)
        })
    else {
        return;
    };
    assert!(m.notices_on(), "the server sends change notices; log:\n{}", m.log());
    let c0 = m.counts();
    assert_eq!(m.sh_ok("find tree | wc -l").trim(), "106");
    let c1 = m.counts();
    // Each of the 6 directories once (and the home, which the shell may list).
    let first = delta(&c0, &c1, "readdir");
    assert!((6..=7).contains(&first), "the first find lists each directory once: {c1:?}");
    let forgot = kernel_forgets();
    assert_eq!(m.sh_ok("find tree -type f | wc -l").trim(), "100");
    assert_eq!(m.sh_ok("ls -lR tree | grep -c '^-'").trim(), "100");
    let c2 = m.counts();
    for kind in ["readdir", "stat", "open"] {
        assert_eq!(delta(&c1, &c2, kind), 0, "{kind} after the first find (kernel forgot: {forgot}): {c2:?}");
    }
}

#[test]
fn mount_rm_rf_of_n_files_costs_about_n_requests() {
    let Some((server, m)) =
        logged_alice("mount_rm_rf_of_n_files_costs_about_n_requests", |s| tree_on_server(s, 2, 150))
    else {
        return;
    };
    let c0 = m.counts();
    m.sh_ok("rm -rf tree");
    let c1 = m.counts();
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    // Unlinks in batches (`Remove`), each directory's rmdir with its last queued unlinks or alone.
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "{c1:?}");
    let (removes, rmdirs) = (delta(&c0, &c1, "remove"), delta(&c0, &c1, "rmdir"));
    assert!(removes >= 1 && rmdirs <= 3, "{c1:?}");
    let total: u64 = c1.keys().map(|k| delta(&c0, &c1, k)).sum();
    assert!(total <= removes + rmdirs + 12, "rm -rf of 300 files in 3 directories cost {total} requests: {c1:?}");
    assert!(removes + rmdirs <= 300 + 3, "rm -rf of 300 files in 3 directories: {removes} removes, {rmdirs} rmdirs");
}

#[test]
fn mount_creating_files_costs_one_request_each_and_no_lookup() {
    let Some((_server, m)) = logged_alice("mount_creating_files_costs_one_request_each_and_no_lookup", |_| ()) else {
        return;
    };
    m.sh_ok("mkdir new");
    let c0 = m.counts();
    m.sh_ok("cd new && for i in $(seq 1 100); do echo $i > f$i; done");
    let c1 = m.counts();
    // Create-behind (creates.rs): one PutFile per file at its close, nothing else.
    assert_eq!(delta(&c0, &c1, "put_file"), 100, "{c1:?}");
    assert_eq!(delta(&c0, &c1, "open") + delta(&c0, &c1, "write_attr") + delta(&c0, &c1, "close"), 0, "{c1:?}");
    // No lookup per file (names in a directory just made are known absent); at most the home's
    // attributes, dropped when `new` was made in it.
    assert!(delta(&c0, &c1, "stat") <= 1, "names in a directory just made are known absent: {c1:?}");
    assert_eq!(m.sh_ok("cat new/f77"), "77\n");
    // A mode set to what it is costs nothing; another one round trip each.
    m.sh_ok("chmod 644 new/f1 new/f2 && chmod 600 new/f3");
    let c2 = m.counts();
    assert_eq!(delta(&c1, &c2, "setattr"), 1, "{c2:?}");
    assert_eq!(m.sh_ok("stat -c %a new/f2 new/f3"), "644\n600\n");
}

#[test]
fn mount_tar_x_costs_few_requests_per_file() {
    let Some((_server, m)) = logged_alice("mount_tar_x_costs_few_requests_per_file", |_| ()) else { return };
    let src = tempfile::tempdir().expect("temp dir");
    for d in 0..4 {
        let dir = src.path().join(format!("d{d}"));
        fs::create_dir(&dir).expect("mkdir");
        for f in 0..50 {
            fs::write(dir.join(format!("f{f}")), vec![b'x'; 3000]).expect("write");
        }
    }
    let tar = src.path().join("t.tar");
    let out = std::process::Command::new("tar")
        .args([
            "cf",
            tar.to_str().expect("utf-8 temp path"),
            "-C",
            src.path().to_str().expect("utf-8"),
            "d0",
            "d1",
            "d2",
            "d3",
        ])
        .output()
        .expect("run tar c");
    assert!(out.status.success(), "tar c: {}", String::from_utf8_lossy(&out.stderr));
    let c0 = m.counts();
    m.sh_ok(&format!("mkdir x && tar xf {} -C x", tar.display()));
    let c1 = m.counts();
    let total: u64 = c1.keys().map(|k| delta(&c0, &c1, k)).sum();
    // Per file one PutFile at its close (create-behind: its write, tar's fchown, fchmod and
    // futimens are kept until then); no lookup (the directories were just made: names known absent).
    assert_eq!(delta(&c0, &c1, "put_file"), 200, "{c1:?}");
    assert_eq!(delta(&c0, &c1, "open"), 0, "{c1:?}");
    assert!(delta(&c0, &c1, "setattr") <= 8, "only the 4 directories' mode and mtime: {c1:?}");
    assert!(delta(&c0, &c1, "stat") <= 10, "no lookup per file: {c1:?}");
    assert!(total <= 200 + 20, "tar x of 200 files cost {total} requests: {c1:?}");
    assert_eq!(m.sh_ok("cat x/d3/f49 | wc -c").trim(), "3000");
}

#[test]
fn mount_rm_rf_of_a_tree_made_through_the_mount_costs_one_request_per_name() {
    let Some((_server, m)) =
        logged_alice("mount_rm_rf_of_a_tree_made_through_the_mount_costs_one_request_per_name", |_| ())
    else {
        return;
    };
    m.sh_ok(
        "mkdir t && cd t && for d in $(seq 1 20); do mkdir d$d; for f in 1 2 3 4 5; do echo x > d$d/f$f; done; done",
    );
    m.sh_ok("ls -lR t > /dev/null && find t > /dev/null");
    let forgot = kernel_forgets();
    let c0 = m.counts();
    m.sh_ok("rm -rf t");
    let c1 = m.counts();
    let total: u64 = c1.keys().map(|k| delta(&c0, &c1, k)).sum();
    let all: Vec<_> = c1.keys().map(|k| (k, delta(&c0, &c1, k))).filter(|(_, n)| *n > 0).collect();
    eprintln!("rm -rf (kernel forgot: {forgot}): {total} requests: {all:?}");
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "in batches: {all:?}");
    assert!(delta(&c0, &c1, "remove") + delta(&c0, &c1, "rmdir") <= 121, "{all:?}");
    assert!(total <= 121 + 3, "rm -rf of 100 files in 21 directories cost {total} requests: {all:?}");
}

#[test]
fn mount_git_status_again_costs_no_readdir() {
    let Some((_server, m)) = logged_alice("mount_git_status_again_costs_no_readdir", |_| ()) else { return };
    m.sh_ok(
        "mkdir r && cd r && git init -q && for d in 1 2 3 4 5; do mkdir d$d; for f in 1 2 3 4 5 6 7 8; do \
         echo $d$f > d$d/f$f; done; done && git add -A && git -c user.name=t -c user.email=t@t commit -qm one",
    );
    let c0 = m.counts();
    let forgot = kernel_forgets();
    assert_eq!(m.sh_ok("cd r && git status --porcelain"), "");
    let c1 = m.counts();
    assert_eq!(m.sh_ok("cd r && git status --porcelain"), "");
    let c2 = m.counts();
    let show = |a: &homefs_tests::mount::Counts, b: &homefs_tests::mount::Counts| {
        b.keys().map(|k| (k.clone(), delta(a, b, k))).filter(|(_, n)| *n > 0).collect::<Vec<_>>()
    };
    eprintln!("git status after drop_caches ({forgot}): {:?}; again: {:?}", show(&c0, &c1), show(&c1, &c2));
    // A name missed costs one listing of its directory (or a stat): a couple at most.
    let misses = delta(&c0, &c1, "readdir") + delta(&c0, &c1, "stat");
    assert!(misses <= 3, "listings kept from the commit: {:?}", show(&c0, &c1));
    // The untracked-file scan lists from the cache; git's index rename leaves one name of .git to
    // look up again (one listing of .git, or a stat).
    let again = delta(&c1, &c2, "readdir") + delta(&c1, &c2, "stat");
    assert!(again <= 3, "the untracked-file scan lists from the cache: {:?}", show(&c1, &c2));
    assert!(delta(&c1, &c2, "stat") <= 3, "lstat of every file from the cache: {:?}", show(&c1, &c2));
}

#[test]
fn mount_listing_a_directory_reads_its_subdirectories_ahead() {
    let Some((_server, m)) =
        logged_alice("mount_listing_a_directory_reads_its_subdirectories_ahead", |s| tree_on_server(s, 20, 5))
    else {
        return;
    };
    let c0 = m.counts();
    // Listing only the top: the 20 subdirectories' listings follow in the background.
    assert_eq!(m.sh_ok("ls tree | wc -l").trim(), "20");
    let mut c1 = m.counts();
    // The home (listed for the lookup of `tree`), `tree`, and its 20 subdirectories.
    wait_until(Duration::from_secs(10), "the 20 subdirectory listings to be read ahead", || {
        c1 = m.counts();
        delta(&c0, &c1, "readdir") >= 22
    });
    // `ls -lR` then walks all 21 directories without a listing or a stat of its own.
    let expected: String = (0..20)
        .map(|d| format!("tree/d{d}:\n{}", (0..5).map(|f| format!("f{f}\n")).collect::<String>()))
        .collect::<Vec<_>>()
        .join("\n");
    let listed = m.sh_ok("ls -R tree | tail -n +2");
    let mut blocks: Vec<&str> = listed.trim().split("\n\n").collect();
    blocks.remove(0); // the top's names
    let mut want: Vec<&str> = expected.split("\n\n").map(str::trim).collect();
    let mut got: Vec<&str> = blocks.iter().map(|b| b.trim()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "ls -R equals the server's tree");
    assert_eq!(m.sh_ok("ls -lR tree | grep -c '^-'").trim(), "100");
    let c2 = m.counts();
    assert_eq!(delta(&c0, &c2, "readdir"), 22, "each directory listed once: {c2:?}");
    assert_eq!(delta(&c1, &c2, "readdir"), 0, "ls -R and ls -lR list from the cache: {c2:?}");
    assert_eq!(delta(&c1, &c2, "stat"), 0, "no stat once the listings are read ahead: {c2:?}");
}

#[test]
fn mount_read_ahead_slides_with_the_walk_through_a_wide_directory() {
    let Some((_server, m)) =
        logged_alice("mount_read_ahead_slides_with_the_walk_through_a_wide_directory", |s| tree_on_server(s, 50, 1))
    else {
        return;
    };
    // As the server lists them (sorted by bytes: d0, d1, d10, ...).
    let mut names: Vec<String> = (0..50).map(|d| format!("d{d}")).collect();
    names.sort();
    let c0 = m.counts();
    let readdirs_reach = |n: u64, what: &str| {
        wait_until(Duration::from_secs(10), what, || delta(&c0, &m.counts(), "readdir") >= n);
    };
    // The home (for the lookup of `tree`), `tree`, and its first 32 subdirectories.
    m.sh_ok("ls tree > /dev/null");
    readdirs_reach(34, "the first 32 subdirectories to be read ahead");
    // Opening the first subdirectory moves the window one on: the 33rd follows.
    m.sh_ok(&format!("ls tree/{} > /dev/null", names[0]));
    readdirs_reach(35, "the window to slide past the first 32 subdirectories");
    // From the 21st on, the window reaches the end.
    m.sh_ok(&format!("ls tree/{} > /dev/null", names[20]));
    readdirs_reach(52, "the window to reach the last subdirectory");
    assert_eq!(m.sh_ok("ls -lR tree | grep -c '^-'").trim(), "50");
    let c1 = m.counts();
    assert_eq!(delta(&c0, &c1, "readdir"), 52, "each directory listed once: {c1:?}");
}

#[test]
fn mount_git_status_on_a_fresh_mount_lists_directories_instead_of_stating_files() {
    let name = "mount_git_status_on_a_fresh_mount_lists_directories_instead_of_stating_files";
    let Some((server, a)) = logged_alice(name, |_| ()) else { return };
    a.sh_ok(
        "mkdir r && cd r && git init -q && for d in 1 2 3 4 5; do mkdir d$d; for f in 1 2 3 4 5 6 7 8; do \
         echo $d$f > d$d/f$f; done; done && git add -A && git -c user.name=t -c user.email=t@t commit -qm one",
    );
    // A second mount knows nothing of the repository yet.
    let b = LoggedMount::new(&server, "alice", PASSWORD, "");
    let c0 = b.counts();
    assert_eq!(b.sh_ok("cd r && git status --porcelain"), "");
    let c1 = b.counts();
    let stats = delta(&c0, &c1, "stat");
    let listings = delta(&c0, &c1, "readdir");
    eprintln!("git status on a fresh mount: {c1:?}");
    // 40 tracked files in 5 directories (and .git's own): a stat each would be 40 and more.
    assert!(stats <= 12, "stat requests {stats} << 40 files: {c1:?}");
    assert!(listings <= 40, "listings {listings}: {c1:?}");
    assert_eq!(b.sh_ok("cat r/d3/f7"), "37\n");
}

/// What the FUSE thread answers without a hop (a stat from the cache, a chown to ourselves, a mode
/// set to what it is) must still come after this process's own queued writes, and cost nothing.
#[test]
fn mount_stat_and_no_op_setattr_after_a_write_see_the_write_without_a_request() {
    let Some((_server, m)) =
        logged_alice("mount_stat_and_no_op_setattr_after_a_write_see_the_write_without_a_request", |_| ())
    else {
        return;
    };
    m.sh_ok("mkdir w && echo x > w/f");
    let script = "import os\n\
                  fd = os.open('w/f', os.O_WRONLY | os.O_TRUNC)\n\
                  for i in range(1, 51):\n\
                  \x20   os.write(fd, b'y' * 1000)\n\
                  \x20   assert os.fstat(fd).st_size == i * 1000, ('fstat', i, os.fstat(fd).st_size)\n\
                  \x20   assert os.stat('w/f').st_size == i * 1000, ('stat', i)\n\
                  \x20   os.fchown(fd, os.getuid(), os.getgid())\n\
                  \x20   os.fchmod(fd, 0o644)\n\
                  os.close(fd)\n\
                  try:\n\
                  \x20   os.chown('w/f', os.getuid() + 1, -1)\n\
                  \x20   print('chown to another owner allowed')\n\
                  except PermissionError:\n\
                  \x20   print('EPERM')\n";
    let c0 = m.counts();
    assert_eq!(m.sh_ok(&format!("python3 -c \"{script}\"")).trim(), "EPERM");
    let c1 = m.counts();
    assert_eq!(delta(&c0, &c1, "setattr"), 0, "chown to ourselves and a mode set to what it is: {c1:?}");
    assert_eq!(m.sh_ok("stat -c '%s %a' w/f"), "50000 644\n");
}
