//! Adversarial review of session 6's commits (batched removes, directory listings the kernel
//! keeps, fsd's inline size lock): each test is a way a user hits a problem, checked through the
//! mount and on the server's disk.

use homefs_tests::mount::{delta, fuse_available, output_within, poll_until, wait_until, LoggedMount, PASSWORD};
use homefs_tests::TestServer;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A server named `name` with user `alice`, `prepare` run on her home on the server's disk.
fn alice(name: &str, prepare: impl FnOnce(&Path)) -> Option<TestServer> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    prepare(&server.home_path("alice"));
    Some(server)
}

/// `n` files `f<i>` in `dir` on the server's disk.
fn files_on_server(dir: &Path, n: usize) {
    fs::create_dir_all(dir).expect("make a directory on the server's disk");
    for i in 0..n {
        fs::write(dir.join(format!("f{i}")), b"x").expect("write a file on the server's disk");
    }
}

/// Runs `script` with `sh -c` in `dir` (bounded), whatever its exit status.
fn sh_in(dir: &Path, script: &str) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir);
    output_within(cmd, Duration::from_secs(60), script)
}

/// The names `ls -a` lists in `dir` of the mount, one line.
fn ls(m: &LoggedMount, dir: &str) -> String {
    m.sh_ok(&format!("ls -a {dir} | tr '\\n' ' '"))
}

/// The first `Remove` a mount sends decides, for the mount's life, whether the server takes
/// batches: lost twice before any was answered means "an older server that closes the connection
/// on it". A server that is merely down (a laptop off the network) for longer than the reconnect
/// timeout when the user first removes a file fails both sends the same way (the connection never
/// comes back in time), so from then on every `rm -rf` sends one `Unlink` per file, although the
/// server is the same new one, and the log says the server closed the connection twice.
#[test]
fn review6_a_first_remove_during_a_long_outage_does_not_turn_batches_off_for_good() {
    let name = "review6_a_first_remove_during_a_long_outage_does_not_turn_batches_off_for_good";
    let Some(mut server) = alice(name, |h| {
        fs::write(h.join("solo"), b"x").expect("solo");
        files_on_server(&h.join("tree/d0"), 40);
    }) else {
        return;
    };
    let m = LoggedMount::new(&server, "alice", PASSWORD, "reconnect_timeout=1");
    m.sh_ok("ls -lR . > /dev/null");
    server.stop();
    // Answered behind from what the mount knows; its Remove (the mount's first) meets no server.
    m.sh_ok("rm solo");
    wait_until(Duration::from_secs(30), "netmount to give up on the unlink of solo (server down)", || {
        m.log().contains("an unlink answered behind failed")
    });
    server.start_again();
    // solo's name came back (its unlink failed): a stat of it asks the server, once reconnected.
    let solo = m.join("solo");
    wait_until(Duration::from_secs(30), "the mount to reach the server again", || {
        sh_in(Path::new("/"), &format!("stat {} > /dev/null", solo.display())).status.success()
    });
    let c0 = m.counts();
    m.sh_ok("rm -rf tree && test ! -e tree");
    let c1 = m.counts();
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    assert_eq!(
        delta(&c0, &c1, "unlink"),
        0,
        "the server is back and takes Remove; rm -rf of 40 files still sent single unlinks \
         (remove={}): {c1:?}\nlog:\n{}",
        delta(&c0, &c1, "remove"),
        m.log()
    );
}

/// telldir/seekdir cookies are readdir offsets, positions in the listing. With the listing kept
/// by the kernel, a handle no longer reads its own snapshot: after another `ls` refilled the
/// kernel's copy with a changed listing, `seekdir` to a cookie taken before the change lands on
/// the position in the NEW listing. A name added before the cookie (here `a-new`, sorted first)
/// shifts every entry by one: the entry read last before the cookie comes again. POSIX leaves
/// only the added or removed name itself unspecified.
#[test]
fn review6_seekdir_to_a_cookie_from_a_kept_listing_after_the_copy_was_refilled() {
    let name = "review6_seekdir_to_a_cookie_from_a_kept_listing_after_the_copy_was_refilled";
    let Some(server) = alice(name, |h| files_on_server(&h.join("d"), 40)) else { return };
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    // Listed twice: the second (and the perl handle's) from the kernel's copy.
    assert_eq!(ls(&m, "d"), ls(&m, "d"));
    let out = m.sh_ok(
        "perl -e '\n\
         opendir(my $d, \"d\") or die \"opendir: $!\";\n\
         my @first = map { scalar readdir($d) } 1..12;\n\
         my $pos = telldir($d);\n\
         my @rest1; while (defined(my $e = readdir($d))) { push @rest1, $e }\n\
         open(my $f, \">\", \"d/a-new\") or die \"create: $!\"; close $f;\n\
         system(\"ls d > /dev/null\") == 0 or die \"ls\";\n\
         seekdir($d, $pos);\n\
         my @rest2; while (defined(my $e = readdir($d))) { push @rest2, $e }\n\
         closedir $d;\n\
         print join(\",\", @first), \"\\n\", join(\",\", @rest1), \"\\n\", join(\",\", @rest2), \"\\n\";\n\
         '",
    );
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.len(), 3, "perl: {out}");
    let (first, rest1, rest2) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(first.len() + rest1.len(), 42, "the whole listing, dots included, once: {out}");
    let again: Vec<&&str> = rest2.iter().filter(|n| first.contains(n)).collect();
    assert!(again.is_empty(), "read before the cookie, returned again after seekdir to it: {again:?}\n{out}");
    let lost: Vec<&&str> = rest1.iter().filter(|n| !rest2.contains(n)).collect();
    assert!(lost.is_empty(), "after the cookie before, missing after seekdir to it: {lost:?}\n{out}");
}

/// A program that removes the entries of a directory as it reads them (one stream, read in
/// getdents chunks), while another process lists the directory: the other `ls` makes the kernel
/// refill its copy with the shorter listing, and the stream continues at its offset (a position)
/// in that copy: as many entries as were removed before the cursor are skipped, files that were
/// there all along and never removed. `rm`-like loops then leave files behind (rmdir: not empty).
/// Before the kernel kept listings, each stream read its own snapshot at stable positions.
#[test]
fn review6_a_directory_stream_misses_no_entry_while_entries_before_it_are_removed() {
    let name = "review6_a_directory_stream_misses_no_entry_while_entries_before_it_are_removed";
    let Some(server) = alice(name, |h| {
        for d in ["d", "e"] {
            fs::create_dir_all(h.join(d)).expect("mkdir");
            for i in 0..2000 {
                fs::write(h.join(d).join(format!("file-with-a-longish-name-{i:05}")), b"x").expect("write a file");
            }
        }
    }) else {
        return;
    };
    // The control: a mount that caches nothing (no FOPEN_CACHE_DIR) reads each stream's snapshot.
    let control = LoggedMount::new(&server, "alice", PASSWORD, "cache_ttl=0");
    let (read, removed) = stream_removing_what_it_read(&control, "e");
    assert_eq!(read, "2000 2000", "control (cache_ttl=0): names read, distinct");
    assert_eq!(control.sh_ok("ls e | wc -l").trim(), (2000 - removed).to_string());
    drop(control);
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    let (read, removed) = stream_removing_what_it_read(&m, "d");
    assert_eq!(read, "2000 2000", "names the stream read, distinct (2000 expected: none skipped)");
    assert_eq!(m.sh_ok("ls d | wc -l").trim(), (2000 - removed).to_string());
}

/// In `dir` of 2,000 names (listed twice before): reads one 4 KiB getdents chunk, removes what it
/// read, lets `ls` list the directory, reads the rest. Returns "NAMES_READ DISTINCT" and how many
/// it removed.
fn stream_removing_what_it_read(m: &LoggedMount, dir: &str) -> (String, usize) {
    // Listed twice: kept by the kernel, whole.
    assert_eq!(m.sh_ok(&format!("ls -f {dir} | wc -l")), "2002\n");
    assert_eq!(m.sh_ok(&format!("ls -f {dir} | wc -l")), "2002\n");
    // getdents64 with a 4 KiB buffer (libc's readdir would take up to 1 MiB at once, st_blksize).
    let script = "import ctypes, sys, os, struct, subprocess\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
NR = {\"x86_64\": 217, \"aarch64\": 61}[os.uname().machine]\n\
buf = ctypes.create_string_buffer(4096)\n\
D = sys.argv[1]\n\
fd = os.open(D, os.O_RDONLY | os.O_DIRECTORY)\n\
def chunk():\n\
\x20   n = libc.syscall(NR, fd, buf, 4096)\n\
\x20   assert n >= 0, os.strerror(ctypes.get_errno())\n\
\x20   out, off = [], 0\n\
\x20   while off < n:\n\
\x20       reclen = struct.unpack_from(\"H\", buf.raw, off + 16)[0]\n\
\x20       out.append(buf.raw[off + 19:off + reclen].split(b\"\\0\")[0].decode())\n\
\x20       off += reclen\n\
\x20   return out\n\
seen = chunk()\n\
removed = 0\n\
for n in seen:\n\
\x20   if n not in (\".\", \"..\"):\n\
\x20       os.unlink(D + \"/\" + n)\n\
\x20       removed += 1\n\
subprocess.run([\"ls\", D], check=True, stdout=subprocess.DEVNULL)\n\
while True:\n\
\x20   more = chunk()\n\
\x20   if not more:\n\
\x20       break\n\
\x20   seen += more\n\
names = [n for n in seen if n not in (\".\", \"..\")]\n\
print(len(names), len(set(names)), removed)\n";
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("stream.py");
    fs::write(&path, script).expect("write the script");
    let out = m.sh_ok(&format!("python3 {} {dir}", path.display()));
    let (read, removed) = out.trim().rsplit_once(' ').expect("three numbers");
    (read.to_string(), removed.parse().expect("a count"))
}

/// A file made directly on the server's disk sends no change notice: a listing the kernel keeps
/// must show it within one cache TTL, like the attribute cache (here `cache_ttl=2`).
#[test]
fn review6_a_kept_listing_shows_a_change_on_the_servers_disk_within_one_ttl() {
    let name = "review6_a_kept_listing_shows_a_change_on_the_servers_disk_within_one_ttl";
    let Some(server) = alice(name, |h| files_on_server(&h.join("d"), 5)) else { return };
    let m = LoggedMount::new(&server, "alice", PASSWORD, "cache_ttl=2");
    let before = ls(&m, "d");
    assert_eq!(ls(&m, "d"), before, "listed again (from the kernel's copy)");
    let d = server.home_path("alice").join("d");
    fs::write(d.join("g-on-disk"), b"y").expect("a file made on the server's disk");
    fs::remove_file(d.join("f0")).expect("a file removed on the server's disk");
    let start = Instant::now();
    let shown = poll_until(Duration::from_secs(10), || {
        let now = ls(&m, "d");
        now.contains(" g-on-disk ") && !now.contains(" f0 ")
    });
    let took = start.elapsed();
    assert!(shown, "the listing never showed the change on the server's disk: {}", ls(&m, "d"));
    assert!(took <= Duration::from_millis(3500), "shown after {took:?}, more than one TTL (2 s) and slack");
}

/// With `cache_ttl=0` nothing may be cached: the kernel keeps no listing, every `ls` is the
/// server's.
#[test]
fn review6_a_cache_ttl_0_mount_lists_the_servers_disk_at_once() {
    let name = "review6_a_cache_ttl_0_mount_lists_the_servers_disk_at_once";
    let Some(server) = alice(name, |h| files_on_server(&h.join("d"), 5)) else { return };
    let m = LoggedMount::new(&server, "alice", PASSWORD, "cache_ttl=0");
    let d = server.home_path("alice").join("d");
    for i in 0..5 {
        assert_eq!(ls(&m, "d"), ls(&m, "d"));
        fs::write(d.join(format!("n{i}")), b"y").expect("a file made on the server's disk");
        let now = ls(&m, "d");
        assert!(now.contains(&format!(" n{i} ")), "round {i}: the next ls shows n{i} at once: {now}");
    }
}

/// The server restarts while files are replaced on its disk (new inode numbers for the same
/// names): within a TTL of the reconnect, the listing shows the new names, and the inode numbers
/// readdir gives (kept by the kernel with the listing) are the ones stat gives.
#[test]
fn review6_a_kept_listing_after_a_server_restart_has_the_new_names_and_inode_numbers() {
    let name = "review6_a_kept_listing_after_a_server_restart_has_the_new_names_and_inode_numbers";
    let Some(mut server) = alice(name, |h| files_on_server(&h.join("d"), 5)) else { return };
    let m = LoggedMount::new(&server, "alice", PASSWORD, "cache_ttl=2");
    let inos = "python3 -c \"import os\nfor e in sorted(os.scandir('d'), key=lambda e: e.name):\n    \
                print(e.name, e.inode(), os.stat('d/' + e.name).st_ino)\"";
    assert_eq!(m.sh_ok(inos), m.sh_ok(inos));
    server.stop();
    let d = server.home_path("alice").join("d");
    for i in 0..5 {
        // A new inode under the same name (the old one stays alive through the hard link).
        fs::hard_link(d.join(format!("f{i}")), d.join(format!(".keep{i}"))).expect("keep the old inode");
        fs::remove_file(d.join(format!("f{i}"))).expect("remove");
        fs::write(d.join(format!("f{i}")), b"new").expect("a new file of the same name");
        fs::remove_file(d.join(format!(".keep{i}"))).expect("drop the link");
    }
    fs::write(d.join("added"), b"y").expect("add");
    server.start_again();
    let mut last = String::new();
    let agreed = poll_until(Duration::from_secs(20), || {
        let Ok(out) = std::str::from_utf8(&sh_in(&m.path, inos).stdout).map(str::to_string) else { return false };
        last = out;
        let lines: Vec<&str> = last.lines().collect();
        lines.len() == 6
            && lines[0].starts_with("added ")
            && lines.iter().all(|l| {
                let v: Vec<&str> = l.split(' ').collect();
                v.len() == 3 && v[1] == v[2]
            })
    });
    assert!(agreed, "readdir's names and inode numbers never agreed with stat after the restart:\n{last}");
}
