//! Directory listings the kernel keeps (`FOPEN_CACHE_DIR`, `mount/src/fuse/handles.rs`): an
//! unchanged directory listed again is read from the kernel's memory, with no `readdirplus`
//! request to netmount (dbench lists an unchanged directory four times in five), and every change
//! shows in the next listing: made through the mount, through another mount, or a file created
//! behind whose store failed.

use homefs_tests::mount::{alice_twice, fuse_available, python, wait_until, LoggedMount, TestMount, PASSWORD};
use homefs_tests::TestServer;
use std::time::Duration;

/// The count of FUSE requests of `kind` in the profile netmount logs at unmount.
fn fuse_ops(log: &str, kind: &str) -> u64 {
    let line = log.lines().rfind(|l| l.contains("FUSE requests served")).expect("netmount logs its FUSE requests");
    let ops = line.split_once("ops=").map_or("", |(_, rest)| rest);
    ops.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| n.parse().expect("a count"))
}

#[test]
fn mount_an_unchanged_listing_is_read_from_the_kernel() {
    let name = "mount_an_unchanged_listing_is_read_from_the_kernel";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    let mut m = LoggedMount::new(&server, "alice", PASSWORD, "");
    m.sh_ok("mkdir d && for i in $(seq 1 30); do echo $i > d/f$i; done");
    let expected: String = (1..=30).map(|i| format!("f{i}\n")).collect::<Vec<_>>().concat();
    let sorted = |s: String| {
        let mut v: Vec<_> = s.lines().map(str::to_string).collect();
        v.sort_by_key(|n| n[1..].parse::<u32>().unwrap_or(0));
        v.iter().map(|n| format!("{n}\n")).collect::<String>()
    };
    for round in 0..20 {
        assert_eq!(sorted(m.sh_ok("ls -f d | grep '^f'")), expected, "listing {round}");
    }
    // A change through the mount: the next listing is the server's, kept again after it.
    m.sh_ok("rm d/f7 && mv d/f8 d/g8");
    let after = expected.replace("f7\n", "").replace("f8\n", "");
    for round in 0..5 {
        assert_eq!(sorted(m.sh_ok("ls -f d | grep '^f'")), after, "listing {round} after the change");
        assert_eq!(m.sh_ok("ls d | grep '^g'"), "g8\n");
    }
    let log = m.stop();
    let (opendirs, pages) = (fuse_ops(&log, "opendir"), fuse_ops(&log, "readdirplus"));
    assert!(opendirs >= 30, "every listing opened the directory: {opendirs} opendir");
    // Without the kernel keeping listings: two pages (entries, then the end) per listing, 60+.
    assert!(pages <= 12, "{pages} readdirplus for {opendirs} opendir of mostly unchanged directories");
}

#[test]
fn mount_a_kept_listing_follows_every_change() {
    let Some((server, a, b)) = alice_twice("mount_a_kept_listing_follows_every_change") else { return };
    let list = |m: &TestMount| m.sh_ok("ls -a d | tr '\\n' ' '");
    // Each step lists twice (the second from the kernel's copy) and must see the change.
    let steps = [
        ("mkdir d && touch d/a", ". .. a "),
        ("echo x > d/b", ". .. a b "),
        ("mv d/a d/c", ". .. b c "),
        ("mv d/c d/a", ". .. a b "),
        ("mkdir d/e && ln -s a d/s && ln d/b d/h", ". .. a b e h s "),
        ("rmdir d/e && rm d/s d/h", ". .. a b "),
        ("python3 -c \"open('d/p', 'w').close()\"", ". .. a b p "),
        ("rm d/p && : > d/q", ". .. a b q "),
    ];
    for (change, expected) in steps {
        a.sh_ok(change);
        assert_eq!(list(&a), expected, "after `{change}`");
        assert_eq!(list(&a), expected, "listed again after `{change}`");
    }
    // Another mount's changes arrive as notices: the listing follows (bounded wait).
    let soon = Duration::from_secs(5);
    b.sh_ok("echo y > d/r && rm d/q");
    wait_until(soon, "A's listing of d to show B's create and unlink", || list(&a) == ". .. a b r ");
    b.sh_ok("mv d/r d/t");
    wait_until(soon, "A's listing of d to show B's rename", || list(&a) == ". .. a b t ");
    assert_eq!(list(&a), ". .. a b t ");
    // A change that leaves the directory's mtime as it was (set back to the nanosecond): the
    // kernel's own check of its copy (i_version, mtime) cannot see it; netmount's can.
    let home = server.home_path("alice");
    let mtime = a.sh_ok(&format!("stat -c %.9Y {}", home.join("d").display()));
    b.sh_ok(&format!("touch d/w && touch -m -d @{} d", mtime.trim()));
    assert_eq!(a.sh_ok(&format!("stat -c %.9Y {}", home.join("d").display())), mtime, "mtime set back");
    wait_until(soon, "A's listing of d to show w, d's mtime unchanged", || list(&a) == ". .. a b t w ");
    // A descriptor opened before a change, read again (rewound) after it, and a fresh listing.
    let out = python(
        &server,
        &a,
        "alice",
        "import os\n\
         fd = os.open('d', os.O_RDONLY | os.O_DIRECTORY)\n\
         before = sorted(os.listdir(fd))\n\
         open('d/u', 'w').close()\n\
         now = sorted(os.listdir('d'))\n\
         os.lseek(fd, 0, os.SEEK_SET)\n\
         again = sorted(os.listdir(fd))\n\
         os.close(fd)\n\
         print(before, now, again, sorted(os.listdir('d')))\n",
    );
    let (before, now) = ("['a', 'b', 't', 'w']", "['a', 'b', 't', 'u', 'w']");
    assert!(out.starts_with(&format!("{before} {now} ")), "python: {out}");
    assert!(out.trim_end().ends_with(now), "a fresh listing after an old handle was read again: {out}");
}

#[test]
fn mount_a_kept_listing_drops_a_file_whose_store_failed() {
    let name = "mount_a_kept_listing_drops_a_file_whose_store_failed";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, Some("64K"));
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    // Created behind (pending in netmount), listed twice while pending, then its store at close
    // fails over the quota: the listings after it must not show it.
    let out = python(
        &server,
        &m,
        "alice",
        "import os, errno\n\
         os.mkdir('d')\n\
         open('d/small', 'w').close()\n\
         f = open('d/big', 'wb')\n\
         f.write(b'x' * 200000)\n\
         print(sorted(os.listdir('d')), sorted(os.listdir('d')))\n\
         try:\n    f.close()\n    print('closed')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n\
         print(sorted(os.listdir('d')), sorted(os.listdir('d')), os.path.exists('d/big'))\n",
    );
    assert_eq!(
        out, "['big', 'small'] ['big', 'small']\nEDQUOT\n['small'] ['small'] False\n",
        "a failed store leaves no name in the listing"
    );
}

#[test]
fn mount_a_large_kept_listing_is_whole_and_follows_removals() {
    let name = "mount_a_large_kept_listing_is_whole_and_follows_removals";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    // Made on the server's disk before the mount: many readdirplus pages, from the server.
    let big = server.home_path("alice").join("big");
    std::fs::create_dir_all(&big).expect("mkdir big");
    for i in 0..1500 {
        std::fs::write(big.join(format!("file-with-a-longish-name-{i:05}")), b"x").expect("write a file");
    }
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let count = |m: &TestMount| m.sh_ok("ls -f big | grep -c '^file-'").trim().parse::<u32>().expect("a count");
    let names = |m: &TestMount| m.sh_ok("ls big | md5sum");
    let first = names(&m);
    for round in 0..3 {
        assert_eq!(count(&m), 1500, "listing {round}: every entry once");
        assert_eq!(names(&m), first, "listing {round}: the same names");
    }
    m.sh_ok("rm big/file-with-a-longish-name-0000*");
    for round in 0..3 {
        assert_eq!(count(&m), 1490, "listing {round} after removing 10");
    }
    assert_eq!(m.sh_ok("ls big | head -1"), "file-with-a-longish-name-00010\n");
}

#[test]
fn mount_a_kept_listing_is_read_again_once_its_attributes_expired() {
    let name = "mount_a_kept_listing_is_read_again_once_its_attributes_expired";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    let d = server.home_path("alice").join("d");
    std::fs::create_dir_all(&d).expect("mkdir d");
    for i in 0..60 {
        std::fs::write(d.join(format!("f{i}")), b"x").expect("write a file");
    }
    let ttl = Duration::from_secs(1);
    let mut m = LoggedMount::new(&server, "alice", PASSWORD, "cache_ttl=1");
    let listed = m.sh_ok("ls -l d | grep -c ' f'");
    assert_eq!(listed, "60\n");
    // The names and attributes the kernel got with the listing expire after one TTL: this is
    // the time passing that the test is about, not a wait for something to happen.
    std::thread::sleep(ttl + Duration::from_millis(300));
    assert_eq!(m.sh_ok("ls -l d | grep -c ' f'"), listed);
    let log = m.stop();
    let (lookups, getattrs, pages) =
        (fuse_ops(&log, "lookup"), fuse_ops(&log, "getattr"), fuse_ops(&log, "readdirplus"));
    // Kept past the TTL, the second `ls -l` would look up and stat each of the 60 names.
    assert!(lookups + getattrs < 30, "{lookups} lookups and {getattrs} getattrs for two `ls -l` of 60 files");
    assert!(pages >= 4, "both listings came from readdirplus: {pages}");
}
