//! Unlink-behind in netmount: `rm` of files the mount knows is answered at once and sent in the
//! background, and what depends on it (rmdir, df, a re-create of the name, unmount) still sees it
//! done; a failed one brings the name back; an open file's unlink keeps its handle working.

use homefs_tests::mount::{delta, fuse_available, names_on_server, Immutable, LoggedMount, PASSWORD};
use homefs_tests::TestServer;
use std::fs;
use std::path::Path;

fn logged_alice(name: &str, quota: Option<&str>, prepare: impl FnOnce(&Path)) -> Option<(TestServer, LoggedMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, quota);
    prepare(&server.home_path("alice"));
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    Some((server, m))
}

/// `files` files of `size` bytes in `home/dir`, written on the server's disk.
fn files_on_server(home: &Path, dir: &str, files: usize, size: usize) {
    let dir = home.join(dir);
    fs::create_dir_all(&dir).expect("make a directory on the server's disk");
    for f in 0..files {
        fs::write(dir.join(format!("f{f}")), vec![b'x'; size]).expect("write a file on the server's disk");
    }
}

#[test]
fn mount_rm_rf_answers_unlinks_behind_and_the_server_ends_empty() {
    let Some((server, m)) = logged_alice("mount_rm_rf_answers_unlinks_behind_and_the_server_ends_empty", None, |h| {
        files_on_server(h, "tree/d0", 150, 1);
        files_on_server(h, "tree/d1", 150, 1);
    }) else {
        return;
    };
    m.sh_ok("ls -lR tree > /dev/null");
    let c0 = m.counts();
    let behind0 = m.hit("unlink_behind");
    m.sh_ok("rm -rf tree && test ! -e tree");
    let c1 = m.counts();
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    // The unlinks were answered before the server had them, and sent in batches (`Remove`, with a
    // directory's rmdir when its unlinks were still queued).
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "{c1:?}");
    assert!(delta(&c0, &c1, "remove") >= 1 && delta(&c0, &c1, "rmdir") <= 3, "{c1:?}");
    let total: u64 = c1.keys().map(|k| delta(&c0, &c1, k)).sum();
    assert!(total <= 300 + 3 + 12, "rm -rf of 300 files in 3 directories cost {total} requests: {c1:?}");
    assert_eq!(m.hit("unlink_behind") - behind0, 300, "every unlink answered behind: {:?}", m.hits());
    // The same names made again at once.
    m.sh_ok("mkdir -p tree/d0 && echo again > tree/d0/f7 && cat tree/d0/f7 > /dev/null");
    assert_eq!(names_on_server(&server.home_path("alice").join("tree/d0")), ["f7"]);
}

#[test]
fn mount_after_unlinks_behind_ls_df_recreate_and_rmdir_see_them_at_once() {
    let Some((server, m)) =
        logged_alice("mount_after_unlinks_behind_ls_df_recreate_and_rmdir_see_them_at_once", Some("20M"), |h| {
            files_on_server(h, "d", 40, 200_000)
        })
    else {
        return;
    };
    let d = server.home_path("alice").join("d");
    m.sh_ok("ls -l d > /dev/null");
    let used = |out: &str| -> u64 {
        let v: Vec<u64> = out.split_whitespace().map(|n| n.parse().expect("a number from stat -f")).collect();
        (v[0] - v[1]) * v[2]
    };
    let before = used(&m.sh_ok("stat -f -c '%b %f %S' ."));
    // In one shell, no pause: the listing, df, and a re-created name see the unlinks.
    let out = m.sh_ok("rm d/f* && ls -A d | wc -l && stat -f -c '%b %f %S' . && echo new > d/f3 && cat d/f3 && ls d");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "0", "ls right after rm: {out}");
    let after = used(lines[1]);
    assert!(after + 7_000_000 < before, "df shows the 8 MB freed at once: {before} -> {after} bytes used");
    assert_eq!(&lines[2..], ["new", "f3"], "{out}");
    assert_eq!(names_on_server(&d), ["f3"], "the server has the unlinks (statfs waited for them)");
    assert_eq!(fs::read_to_string(d.join("f3")).expect("f3 on the server"), "new\n");
    // rmdir right after the last unlink.
    m.sh_ok("rm d/f3 && rmdir d && test ! -e d");
    assert!(!d.exists(), "d is gone on the server");
    m.counts();
    assert!(m.hit("unlink_behind") >= 41, "unlinks answered behind: {:?}", m.hits());
}

#[test]
fn mount_a_failed_unlink_behind_brings_the_name_back_with_its_data() {
    let Some((server, m)) =
        logged_alice("mount_a_failed_unlink_behind_brings_the_name_back_with_its_data", None, |h| {
            files_on_server(h, "d", 3, 1000)
        })
    else {
        return;
    };
    let d = server.home_path("alice").join("d");
    let Some(immutable) =
        Immutable::set("mount_a_failed_unlink_behind_brings_the_name_back_with_its_data", &d.join("f1"))
    else {
        return;
    };
    m.sh_ok("ls -l d > /dev/null");
    let c0 = m.counts();
    // rm is answered before the server refuses; the rmdir after it finds the directory not empty.
    let out = m.sh_ok("rm d/f0 d/f1 d/f2; rmdir d 2> err; cat err; ls d");
    drop(immutable);
    let c1 = m.counts();
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "{c1:?}");
    assert!((1..=3).contains(&delta(&c0, &c1, "remove")), "the 3 unlinks in 1 to 3 batches: {c1:?}");
    assert!(out.to_lowercase().contains("not empty"), "rmdir of d with f1 back in it: {out}");
    assert!(out.trim_end().ends_with("f1"), "f1 back on ls: {out}");
    assert_eq!(m.sh_ok("ls d"), "f1\n");
    assert_eq!(m.sh_ok("wc -c < d/f1").trim(), "1000", "no data lost");
    assert_eq!(names_on_server(&d), ["f1"]);
    assert!(m.log().contains("an unlink answered behind failed"), "logged:\n{}", m.log());
}

#[test]
fn mount_rm_of_an_open_file_keeps_its_handle_working() {
    let Some((_server, m)) = logged_alice("mount_rm_of_an_open_file_keeps_its_handle_working", None, |_| ()) else {
        return;
    };
    m.sh_ok("echo x > other && ls -l > /dev/null");
    let c0 = m.counts();
    let behind0 = m.hit("unlink_behind");
    let script = "import os\n\
                  fd = os.open('f', os.O_RDWR | os.O_CREAT, 0o644)\n\
                  os.write(fd, b'hello')\n\
                  os.unlink('f')\n\
                  assert not os.path.exists('f')\n\
                  os.write(fd, b' world')\n\
                  os.lseek(fd, 0, 0)\n\
                  print(os.read(fd, 100).decode(), os.fstat(fd).st_size)\n\
                  os.close(fd)\n";
    fs::write(m.join("t.py"), script).expect("write the script");
    assert_eq!(m.sh_ok("python3 t.py && ls"), "hello world 11\nother\nt.py\n");
    let c1 = m.counts();
    assert_eq!(delta(&c0, &c1, "unlink"), 1, "{c1:?}");
    assert_eq!(m.hit("unlink_behind"), behind0, "the open file's unlink was synchronous: {:?}", m.hits());
    // A file not open is answered behind.
    m.sh_ok("rm other && test ! -e other");
    m.counts();
    assert_eq!(m.hit("unlink_behind"), behind0 + 1, "{:?}", m.hits());
}

#[test]
fn mount_pending_unlinks_are_sent_before_netmount_exits() {
    let Some((server, mut m)) =
        logged_alice("mount_pending_unlinks_are_sent_before_netmount_exits", None, |h| files_on_server(h, "d", 500, 1))
    else {
        return;
    };
    m.sh_ok("ls -l d > /dev/null");
    // Unmounted right after rm: whatever is still pending is sent before the daemon exits.
    let mnt = m.path.display().to_string();
    m.sh_ok(&format!("cd / && rm {mnt}/d/* && fusermount3 -u {mnt}"));
    let log = m.stop();
    assert_eq!(names_on_server(&server.home_path("alice").join("d")), Vec::<String>::new(), "log:\n{log}");
    assert!(log.contains("unlink_behind=500"), "500 unlinks answered behind; log:\n{log}");
}

#[test]
fn mount_unlinks_answered_while_the_server_is_down_land_once_it_is_back() {
    let Some((mut server, m)) =
        logged_alice("mount_unlinks_answered_while_the_server_is_down_land_once_it_is_back", None, |h| {
            files_on_server(h, "d", 20, 10)
        })
    else {
        return;
    };
    m.sh_ok("ls -l d > /dev/null");
    server.stop();
    // Answered from what the mount knows; sent when the connection is back.
    assert_eq!(m.sh_ok("rm d/* && ls -A d | wc -l").trim(), "0");
    server.start_again();
    // statfs waits for them (and then asks the server itself).
    m.sh_ok("df . > /dev/null");
    assert_eq!(names_on_server(&server.home_path("alice").join("d")), Vec::<String>::new());
    m.counts();
    assert_eq!(m.hit("unlink_behind"), 20, "{:?}", m.hits());
    m.sh_ok("rmdir d && test ! -e d");
}
