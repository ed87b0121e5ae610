//! Batched removes (`Request::Remove`) through netmount: `rm -rf` sends the unlinks answered
//! behind in batches, with a directory's queued unlinks and its rmdir in one request; a failed
//! unlink in a batch brings its name back; an rmdir of a directory that another mount filled
//! meanwhile fails with ENOTEMPTY; removes spanning a server restart complete.

use homefs_tests::mount::{
    child_output_within, delta, fuse_available, names_on_server, poll_until, wait_until, Immutable, LoggedMount,
    PASSWORD,
};
use homefs_tests::TestServer;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn logged_alice(name: &str, prepare: impl FnOnce(&Path)) -> Option<(TestServer, LoggedMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    prepare(&server.home_path("alice"));
    let m = LoggedMount::new(&server, "alice", PASSWORD, "");
    Some((server, m))
}

/// `dirs` directories `tree/d<i>` of `files` files `f<j>` of `size` bytes, on the server's disk.
fn tree_on_server(home: &Path, dirs: usize, files: usize, size: usize) {
    for d in 0..dirs {
        let dir = home.join(format!("tree/d{d}"));
        fs::create_dir_all(&dir).expect("make a directory on the server's disk");
        for f in 0..files {
            fs::write(dir.join(format!("f{f}")), vec![b'x'; size]).expect("write a file on the server's disk");
        }
    }
}

#[test]
fn mount_rm_rf_of_a_tree_sends_batches_not_one_request_per_file() {
    let Some((server, m)) =
        logged_alice("mount_rm_rf_of_a_tree_sends_batches_not_one_request_per_file", |h| tree_on_server(h, 3, 150, 1))
    else {
        return;
    };
    m.sh_ok("ls -lR tree > /dev/null");
    let c0 = m.counts();
    m.sh_ok("rm -rf tree && test ! -e tree");
    let c1 = m.counts();
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    assert_eq!(m.hit("unlink_behind"), 450, "every unlink answered behind: {:?}", m.hits());
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "no single unlink: {c1:?}");
    let (removes, rmdirs) = (delta(&c0, &c1, "remove"), delta(&c0, &c1, "rmdir"));
    assert!(removes >= 1, "the unlinks went in Remove batches: {c1:?}");
    // How many share a batch depends on timing (the unlinks the kernel sends during one round
    // trip); never more requests than one per name (454 before batches). Batch sizes are checked
    // without timing in `mount_unlinks_answered_while_the_server_is_down_go_in_few_batches`.
    assert!(
        removes + rmdirs <= 450 + 4,
        "rm -rf of 450 files in 4 directories cost {removes} removes + {rmdirs} rmdirs"
    );
    let total: u64 = c1.keys().map(|k| delta(&c0, &c1, k)).sum();
    assert!(total <= removes + rmdirs + 8, "nothing else of note: {c1:?}");
    // The same names made again at once.
    m.sh_ok("mkdir -p tree/d0 && echo again > tree/d0/f7 && cat tree/d0/f7 > /dev/null");
    assert_eq!(names_on_server(&server.home_path("alice").join("tree/d0")), ["f7"]);
}

#[test]
fn mount_a_failed_unlink_in_a_batch_brings_its_name_back_and_the_rmdir_fails() {
    let Some((server, m)) =
        logged_alice("mount_a_failed_unlink_in_a_batch_brings_its_name_back_and_the_rmdir_fails", |h| {
            tree_on_server(h, 1, 60, 1000)
        })
    else {
        return;
    };
    let d = server.home_path("alice").join("tree/d0");
    let Some(immutable) =
        Immutable::set("mount_a_failed_unlink_in_a_batch_brings_its_name_back_and_the_rmdir_fails", &d.join("f37"))
    else {
        return;
    };
    m.sh_ok("ls -l tree/d0 > /dev/null");
    let c0 = m.counts();
    // Every rm is answered before the server refuses f37; the rmdir right after finds it back.
    let out = m.sh_ok("cd tree/d0 && rm f*; cd ../..; rmdir tree/d0 2> err; cat err; ls tree/d0");
    drop(immutable);
    let c1 = m.counts();
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "{c1:?}");
    assert!(delta(&c0, &c1, "remove") >= 1, "{c1:?}");
    assert_eq!(m.hit("unlink_behind"), 60, "{:?}", m.hits());
    assert!(out.to_lowercase().contains("not empty"), "rmdir of d0 with f37 back in it: {out}");
    assert!(
        out.trim_end().ends_with("f37"),
        "f37 back on ls: {out}\nlog:\n{}\nserver:\n{}",
        m.log(),
        server.stderr_log()
    );
    assert_eq!(m.sh_ok("ls tree/d0"), "f37\n");
    assert_eq!(m.sh_ok("wc -c < tree/d0/f37").trim(), "1000", "no data lost");
    assert_eq!(names_on_server(&d), ["f37"]);
    assert!(m.log().contains("an unlink answered behind failed"), "logged:\n{}", m.log());
    m.sh_ok("rm tree/d0/f37 && rmdir tree/d0 && test ! -e tree/d0");
    assert!(!d.exists());
}

#[test]
fn mount_rmdir_of_a_directory_another_mount_added_to_is_not_empty() {
    let Some((server, a)) =
        logged_alice("mount_rmdir_of_a_directory_another_mount_added_to_is_not_empty", |h| tree_on_server(h, 1, 40, 1))
    else {
        return;
    };
    let b = LoggedMount::new(&server, "alice", PASSWORD, "");
    a.sh_ok("ls -l tree/d0 > /dev/null");
    // B adds a file; A removes the names it knows (no glob: A's listing may already show it).
    b.sh_ok("echo new > tree/d0/added");
    wait_until(Duration::from_secs(10), "the file B made to be on the server", || {
        server.home_path("alice").join("tree/d0/added").exists()
    });
    let names: Vec<String> = (0..40).map(|f| format!("f{f}")).collect();
    let out = a.sh_ok(&format!("cd tree/d0 && rm {} && cd ../.. && rmdir tree/d0 2>&1; ls tree/d0", names.join(" ")));
    assert!(out.to_lowercase().contains("not empty"), "rmdir with B's file in it: {out}");
    assert!(out.trim_end().ends_with("added"), "A lists B's file: {out}");
    assert_eq!(names_on_server(&server.home_path("alice").join("tree/d0")), ["added"]);
    assert_eq!(a.sh_ok("cat tree/d0/added"), "new\n");
}

#[test]
fn mount_removes_through_a_server_restart_complete() {
    let Some((mut server, m)) =
        logged_alice("mount_removes_through_a_server_restart_complete", |h| tree_on_server(h, 3, 100, 1))
    else {
        return;
    };
    m.sh_ok("ls -lR tree > /dev/null && rm tree/d2/f0");
    server.stop();
    // As rm -rf does it, without its fstatfs (which waits for the server: usage.rs): each
    // directory's files, then the directory. The unlinks are answered from what the mount knows;
    // the first rmdir waits for the server with them.
    let rm = Command::new("sh")
        .arg("-c")
        .arg("for d in d0 d1 d2; do rm tree/$d/* && rmdir tree/$d || exit 1; done; rmdir tree && test ! -e tree && echo gone")
        .current_dir(&m.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the removes");
    // 1 before, and the 100 of d0; its rmdir then waits.
    let mut answered = 0;
    let waited = poll_until(Duration::from_secs(30), || {
        m.counts();
        answered = m.hit("unlink_behind");
        answered >= 101
    });
    assert!(waited, "{answered} unlinks answered behind while the server was down, not 101: {:?}", m.hits());
    server.start_again();
    let out = child_output_within(rm, Duration::from_secs(120), "the removes across the restart");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("gone"),
        "removes: {out:?}\nlog:\n{}",
        m.log()
    );
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    let c = m.counts();
    assert_eq!(m.hit("unlink_behind"), 300, "{:?}", m.hits());
    assert_eq!(c.get("unlink").copied().unwrap_or(0), 0, "batches, no fallback to single unlinks: {c:?}");
}

#[test]
fn mount_unlinks_answered_while_the_server_is_down_go_in_few_batches() {
    let Some((mut server, m)) =
        logged_alice("mount_unlinks_answered_while_the_server_is_down_go_in_few_batches", |h| {
            tree_on_server(h, 2, 100, 1)
        })
    else {
        return;
    };
    m.sh_ok("ls -lR tree > /dev/null");
    let c0 = m.counts();
    server.stop();
    // All 200 answered from what the mount knows; one batch waits for the server, a second once
    // a whole batch (128) gathered, the rest stays queued.
    m.sh_ok("rm tree/d0/* tree/d1/*");
    server.start_again();
    m.sh_ok("rmdir tree/d0 tree/d1 tree && test ! -e tree");
    let c1 = m.counts();
    assert!(!server.home_path("alice").join("tree").exists(), "the tree is gone on the server");
    assert_eq!(m.hit("unlink_behind"), 200, "{:?}", m.hits());
    assert_eq!(delta(&c0, &c1, "unlink"), 0, "{c1:?}");
    let (removes, rmdirs) = (delta(&c0, &c1, "remove"), delta(&c0, &c1, "rmdir"));
    // 1 + 128 + 71 unlinks, and the rmdirs alone or with nothing queued: a handful of requests.
    assert!(removes + rmdirs <= 8, "200 unlinks and 3 rmdirs cost {removes} removes + {rmdirs} rmdirs: {c1:?}");
}
