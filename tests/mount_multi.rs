//! Several mounts at once: two users isolated, close-to-open between two mounts of one user,
//! flock and fcntl (sqlite) locks across mounts, and a server restarted under a live mount.

use homefs_tests::mount::{alice_twice, fuse_available, wait_until, LoggedMount, TestMount, PASSWORD};
use homefs_tests::{hash, TestServer};
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn mount_two_users_are_isolated() {
    if !fuse_available("mount_two_users_are_isolated") {
        return;
    }
    let server = TestServer::start("mount_two_users_are_isolated");
    server.add_user("alice", PASSWORD, None);
    server.add_user("bob", "bobs password", None);
    let a = TestMount::new(&server, "alice", PASSWORD, "");
    let b = TestMount::new(&server, "bob", "bobs password", "");
    a.sh_ok("echo alice > mine");
    b.sh_ok("echo bob > mine");
    assert_eq!(a.sh_ok("cat mine"), "alice\n");
    assert_eq!(b.sh_ok("cat mine"), "bob\n");
    assert_eq!(b.sh_ok("ls -A"), "mine\n");
    b.sh_ok("mkdir sub && cd sub && ls -A .. > ../listing");
    assert_eq!(b.sh_ok("cat listing"), "listing\nmine\nsub\n", "bob's tree has only bob's files");
    assert_eq!(fs::read(server.home_path("alice").join("mine")).unwrap(), b"alice\n");
}

#[test]
fn mount_close_to_open_between_mounts() {
    let Some((_server, a, b)) = alice_twice("mount_close_to_open_between_mounts") else { return };
    a.sh_ok("echo first > f");
    assert_eq!(b.sh_ok("cat f"), "first\n");
    // Rewritten and grown on A: B's next open sees it at once (no waiting for a TTL).
    a.sh_ok("echo 'second, and longer' > f");
    assert_eq!(b.sh_ok("cat f"), "second, and longer\n");
    a.sh_ok("echo third >> f");
    assert_eq!(hash(&fs::read(b.join("f")).unwrap()), hash(b"second, and longer\nthird\n"));
}

#[test]
fn mount_flock_across_mounts() {
    let Some((_server, a, b)) = alice_twice("mount_flock_across_mounts") else { return };
    a.sh_ok("touch lockfile");
    // A holds the lock until told to let go (a file appears); it says when it holds it.
    let mut holder = Command::new("flock")
        .arg(a.join("lockfile"))
        .args(["-c", "touch held; while [ ! -e release ]; do sleep 0.02; done"])
        .current_dir(&a.path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "mount A to take the flock", || a.join("held").exists());
    let out = b.sh("flock -n lockfile -c true");
    assert!(!out.status.success(), "flock -n from mount B must fail while A holds the lock");
    fs::write(a.join("release"), b"").unwrap();
    let status = holder.wait().unwrap();
    assert!(status.success());
    // The holder's exit releases its flock through the close's FUSE_RELEASE, which the kernel
    // sends in the background (it does not wait for it): free within moments, not at once.
    wait_until(Duration::from_secs(10), "A's flock to be released after its holder exited", || {
        b.sh("flock -n lockfile -c true").status.success()
    });
    // A blocking flock on B waits for A and then gets the lock.
    a.sh_ok("rm release held");
    let mut holder = Command::new("flock")
        .arg(a.join("lockfile"))
        .args(["-c", "touch held; while [ ! -e release ]; do sleep 0.02; done"])
        .current_dir(&a.path)
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "mount A to take the flock again", || a.join("held").exists());
    let mut waiter = Command::new("flock")
        .arg(b.join("lockfile"))
        .args(["-c", "touch got-it"])
        .current_dir(&b.path)
        .spawn()
        .unwrap();
    fs::write(a.join("release"), b"").unwrap();
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    assert!(b.join("got-it").exists());
}

#[test]
fn mount_sqlite_writers_on_two_mounts() {
    let Some((_server, a, b)) = alice_twice("mount_sqlite_writers_on_two_mounts") else { return };
    a.sh_ok("sqlite3 db 'create table t(who text, n int);'");
    const ROWS: usize = 40;
    let writer = |m: &TestMount, who: &str| {
        let script = format!(
            "i=0; while [ $i -lt {ROWS} ]; do \
               sqlite3 -cmd '.timeout 30000' db \"begin immediate; insert into t values('{who}', $i); commit;\" || exit 1; \
               i=$((i+1)); done"
        );
        Command::new("sh").arg("-c").arg(script).current_dir(&m.path).spawn().unwrap()
    };
    let (mut wa, mut wb) = (writer(&a, "a"), writer(&b, "b"));
    assert!(wa.wait().unwrap().success(), "writer on mount A");
    assert!(wb.wait().unwrap().success(), "writer on mount B");
    assert_eq!(
        b.sh_ok("sqlite3 db 'pragma integrity_check; select count(*) from t; select count(distinct n) from t;'"),
        format!("ok\n{}\n{ROWS}\n", 2 * ROWS)
    );
    // fcntl locks are really shared: a write lock held on A makes B's writer wait, not corrupt.
    assert_eq!(a.sh_ok("sqlite3 db 'pragma integrity_check;'"), "ok\n");
}

#[test]
fn mount_survives_server_restart() {
    if !fuse_available("mount_survives_server_restart") {
        return;
    }
    let mut server = TestServer::start("mount_survives_server_restart");
    server.add_user("alice", PASSWORD, None);
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.join("before.bin"), &data).unwrap();
    server.restart();
    // The first calls wait for the reconnect (bounded by reconnect_timeout), then work.
    assert_eq!(hash(&fs::read(m.join("before.bin")).unwrap()), hash(&data), "earlier file intact");
    m.sh_ok("echo after > after.txt && mkdir d && mv after.txt d/");
    assert_eq!(fs::read(server.home_path("alice").join("d/after.txt")).unwrap(), b"after\n");
    m.unmount();
}

#[test]
fn mount_outage_fails_within_reconnect_timeout() {
    if !fuse_available("mount_outage_fails_within_reconnect_timeout") {
        return;
    }
    let mut server = TestServer::start("mount_outage_fails_within_reconnect_timeout");
    server.add_user("alice", PASSWORD, None);
    let m = TestMount::new(&server, "alice", PASSWORD, "reconnect_timeout=2,cache_ttl=0");
    m.sh_ok("echo kept > kept");
    server.stop();
    // A call during the outage waits for the connection up to the bound, then fails.
    let started = std::time::Instant::now();
    let mut stat = Command::new("stat");
    stat.arg(m.join("never-seen-before"));
    let out = homefs_tests::mount::output_within(stat, Duration::from_secs(60), "stat during the outage");
    let waited = started.elapsed();
    assert!(!out.status.success(), "stat cannot succeed with the server down");
    assert!(waited < Duration::from_secs(20), "the outage wait is bounded (took {waited:?})");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Input/output error") || err.contains("timed out") || err.contains("not connected"),
        "fails with an I/O error: {err}"
    );
    // Back again: the mount recovers by itself.
    server.start_again();
    assert_eq!(m.sh_ok("cat kept"), "kept\n");
    m.sh_ok("echo new > new");
}

#[test]
fn mount_changes_by_another_mount_are_seen_well_before_the_cache_ttl() {
    let name = "mount_changes_by_another_mount_are_seen_well_before_the_cache_ttl";
    if !fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, None);
    // A caches for 60 s (change notices on); every change below must reach it in under 5 s.
    let a = LoggedMount::new(&server, "alice", PASSWORD, "");
    assert!(a.notices_on(), "the server sends change notices; log:\n{}", a.log());
    let b = TestMount::new(&server, "alice", PASSWORD, "");
    let soon = Duration::from_secs(5);
    a.sh_ok("mkdir d && echo one > d/f && ls -l d > /dev/null && test ! -e d/g && stat d/f > /dev/null");
    let list = |m: &LoggedMount| m.sh_ok("ls d").split_whitespace().map(str::to_string).collect::<Vec<_>>().join(" ");
    assert_eq!(list(&a), "f");

    b.sh_ok("echo new > d/g");
    wait_until(soon, "A to see d/g created by B", || a.join("d/g").exists());
    wait_until(soon, "A's listing of d to show g", || list(&a) == "f g");

    b.sh_ok("rm d/f");
    wait_until(soon, "A to see d/f unlinked by B", || !a.join("d/f").exists());

    b.sh_ok("mv d/g d/h");
    wait_until(soon, "A to see d/g renamed to d/h by B", || !a.join("d/g").exists() && a.join("d/h").exists());
    assert_eq!(list(&a), "h");

    b.sh_ok("echo 'longer than before' >> d/h");
    let size = || fs::metadata(a.join("d/h")).map(|m| m.len()).unwrap_or(0);
    wait_until(soon, "A to see the new size of d/h written by B", || size() == 23);
    assert_eq!(a.sh_ok("cat d/h"), "new\nlonger than before\n");

    b.sh_ok("mkdir d/sub && touch d/sub/x");
    wait_until(soon, "A to see d/sub/x made by B", || a.join("d/sub/x").exists());
    assert!(a.join("d/sub").is_dir());

    b.sh_ok("rm -r d");
    wait_until(soon, "A to see d removed by B", || !a.join("d").exists());
}

/// The next line `child` prints, waiting at most `bound`.
fn line_within(out: std::process::ChildStdout, bound: Duration, what: &str) -> (String, std::process::ChildStdout) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(out);
        let mut line = String::new();
        let read = reader.read_line(&mut line).map(|_| line);
        let _ = tx.send((read, reader.into_inner()));
    });
    let (line, out) = rx.recv_timeout(bound).unwrap_or_else(|_| panic!("waited {bound:?} for {what}"));
    (line.unwrap_or_else(|e| panic!("{what}: {e}")), out)
}

/// Waits at most `bound` for `child` to exit successfully; its stdout.
fn output_of(child: std::process::Child, bound: Duration, what: &str) -> String {
    let out = homefs_tests::mount::child_output_within(child, bound, what);
    assert!(out.status.success(), "{what}: {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mount_a_lock_granted_after_another_mount_let_go_sees_what_it_changed_under_it() {
    use std::io::Write;
    let Some((_server, a, b)) = alice_twice("mount_lock_grant_is_a_barrier") else { return };
    a.sh_ok("touch lockfile && echo start > data");
    // B holds the lock, rewrites `data` when told, and lets go; A waits for the lock and, in
    // the same process right after the grant, looks at `data` (well within the notices' 3 ms
    // coalescing: without the barrier A's caches still answered with what it saw before).
    const HOLDER: &str = "import fcntl, os, sys
fd = os.open('lockfile', os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print('held', flush=True)
sys.stdin.readline()
with open('data', 'w') as f:
    f.write(sys.argv[1])
fcntl.flock(fd, fcntl.LOCK_UN)
";
    const WAITER: &str = "import fcntl, os, sys
fd = os.open('lockfile', os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sys.exit('the lock was free: B should hold it')
except BlockingIOError:
    pass
print('waiting', flush=True)
fcntl.flock(fd, fcntl.LOCK_EX)
size = os.stat('data').st_size
with open('data') as f:
    print(size, f.read(), sep='|', end='')
";
    let bound = Duration::from_secs(30);
    for round in 1..=10 {
        let content = format!("round {round}: {}\n", "y".repeat(round * 7));
        let before = a.sh_ok("cat data");
        let mut holder = Command::new("python3")
            .args(["-c", HOLDER, &content])
            .current_dir(&b.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (held, _) = line_within(holder.stdout.take().unwrap(), bound, "B to hold the lock");
        assert_eq!(held, "held\n");
        let mut waiter = Command::new("python3")
            .args(["-c", WAITER])
            .current_dir(&a.path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (waiting, out) = line_within(waiter.stdout.take().unwrap(), bound, "A to wait for the lock");
        assert_eq!(waiting, "waiting\n");
        waiter.stdout = Some(out);
        holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
        output_of(holder, bound, "B's holder");
        let seen = output_of(waiter, bound, "A's waiter");
        assert_eq!(
            seen,
            format!("{}|{content}", content.len()),
            "round {round}: A under the lock sees B's change (it had seen {before:?})"
        );
    }
}
