//! Adversarial review of session 5's commits (usage figures, create-behind's `still_held`,
//! detached reads): each test is a way a user hits a problem, checked through the mount and on
//! the server's disk.

use homefs_tests::mount::{mounted_alice, poll_until, wait_until, TestMount};
use homefs_tests::TestServer;
use std::fs;
use std::time::Duration;

/// Runs `body` after the tests' python prelude (`support::mount::PY_PRELUDE`) in alice's mount.
fn python(server: &TestServer, m: &TestMount, body: &str) -> String {
    homefs_tests::mount::python(server, m, "alice", body)
}

/// creates.rs documents that a close of a never-written new file by a process that no longer
/// holds it stores the file at once (`exec 3>f; exec 3>&-`: on the server when the shell
/// returns). `still_held` once decided "holds it" by a suffix match of `/proc/PID/fd` links against
/// the path inside the mount, so a process holding ANY file whose path ends in `/NAME` (here
/// `/tmp/XXX/f1`, outside the mount) counts as holding `f1`: the close leaves it pending, and
/// while another process (a child that inherited the descriptor) keeps it open, it is not on the
/// server at all. The control (`f0`, nothing else held) shows the documented behaviour.
#[test]
fn review5_untouched_close_by_a_process_holding_another_file_of_the_same_name_stores_it() {
    let Some((server, m)) =
        mounted_alice("review5_untouched_close_by_a_process_holding_another_file_of_the_same_name_stores_it", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "def close_with_a_child_holding(name):\n\
         \x20   fd = os.open(name, W, 0o644)\n\
         \x20   r, w = os.pipe()\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       signal.alarm(20)\n\
         \x20       os.close(w)\n\
         \x20       os.read(r, 1)\n\
         \x20       os._exit(0)\n\
         \x20   os.close(r)\n\
         \x20   os.close(fd)\n\
         \x20   stored = os.path.exists(srv(name))\n\
         \x20   os.close(w)\n\
         \x20   os.waitpid(pid, 0)\n\
         \x20   until(name + ' stored once the child closed it too', lambda: os.path.exists(srv(name)))\n\
         \x20   return stored\n\
         assert close_with_a_child_holding('f0'), 'control: f0 not on the server after its close'\n\
         d = tempfile.mkdtemp()\n\
         other = open(os.path.join(d, 'f1'), 'w')\n\
         assert close_with_a_child_holding('f1'), \
'f1 not on the server after its close: the closing process holds only ' + os.path.join(d, 'f1')\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

/// `(size, used)` in bytes from `stat -f -c '%b %f %S'` run in the mount's root.
fn df(m: &TestMount) -> (u64, u64) {
    let out = m.sh_ok("stat -f -c '%b %f %S' .");
    let v: Vec<u64> = out.split_whitespace().map(|n| n.parse().expect("a number from stat -f")).collect();
    assert_eq!(v.len(), 3, "stat -f printed {out:?}");
    (v[0] * v[2], (v[0] - v[1]) * v[2])
}

/// The administrator raises alice's quota with `fsd user quota` (the running server reloads the
/// users file and applies it to her live sessions at once). usage.rs answers `df` from figures
/// asked within the last 60 s while no change is known: without a change notice for the new
/// quota, `df` showed the old size for up to a minute while a write past it already succeeded.
#[test]
fn review5_df_shows_a_quota_set_by_fsd_user_quota() {
    let Some((server, m)) = mounted_alice("review5_df_shows_a_quota_set_by_fsd_user_quota", Some("16M")) else {
        return;
    };
    assert_eq!(df(&m).0, 16 << 20, "df size is the quota");
    assert_eq!(df(&m).0, 16 << 20, "df again (answered from the last figures)");
    server.fsd_ok(&["user", "quota", "alice", "32M"], "");
    // Given a moment (a change notice, if the fix sends one, arrives asynchronously).
    let mut size = 0;
    poll_until(Duration::from_secs(5), || {
        size = df(&m).0;
        size == 32 << 20
    });
    // The server applies it at once: 20 MiB now fit (and this write makes the figures stale).
    m.sh_ok("head -c 20971520 /dev/zero > big && rm big");
    assert_eq!(df(&m).0, 32 << 20, "the server has the new quota");
    assert_eq!(size, 32 << 20, "df within 5 s of `fsd user quota alice 32M`");
}

/// The server restarts (here with a file added to alice's home while it was down, as a restore
/// from backup would). Right after, `df` must ask the server: figures asked before the restart
/// are fresh only on the connection they were asked on (no notice covers the outage).
#[test]
fn review5_df_right_after_a_server_restart_asks_the_server() {
    let Some((mut server, m)) = mounted_alice("review5_df_right_after_a_server_restart_asks_the_server", Some("16M"))
    else {
        return;
    };
    let (_, used0) = df(&m);
    assert_eq!(df(&m).1, used0, "df again (answered from the last figures)");
    server.stop();
    fs::write(server.home_path("alice").join("restored"), vec![7u8; 4 << 20]).expect("write into the home");
    let home = server.home_path("alice");
    std::process::Command::new("chown")
        .arg("--reference")
        .arg(&home)
        .arg(home.join("restored"))
        .status()
        .expect("chown");
    server.start_again();
    let (_, used1) = df(&m);
    // The server does count it (once the mount has reconnected):
    wait_until(Duration::from_secs(15), "df to show the 4 MiB restored while the server was down", || {
        df(&m).1 == used0 + (4 << 20)
    });
    assert_eq!(used1, used0 + (4 << 20), "df right after the server restarted with 4 MiB more in the home");
}

/// FUSE gives a close's thread id, not its process id: `still_held` reads `/proc/TID/fd`, which
/// the kernel answers for a thread id too (the fd table is the process's). A close of a dup on
/// another thread while the main thread holds the new file leaves it pending (the `cmd > f`
/// case), and the last close stores it with its data.
#[test]
fn review5_an_untouched_close_on_another_thread_sees_the_process_descriptors() {
    let Some((server, m)) =
        mounted_alice("review5_an_untouched_close_on_another_thread_sees_the_process_descriptors", None)
    else {
        return;
    };
    let out = python(
        &server,
        &m,
        "import threading\n\
         fd = os.open('t', W, 0o644)\n\
         t = threading.Thread(target=lambda: os.close(os.dup(fd)))\n\
         t.start(); t.join()\n\
         assert not os.path.exists(srv('t')), 'held by the process: left pending at the thread\\'s close'\n\
         os.write(fd, b'data')\n\
         os.close(fd)\n\
         with open(srv('t'), 'rb') as f:\n\
         \x20   assert f.read() == b'data'\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

/// `df` (statvfs) right after each change through this mount that moves usage, with the
/// figures asked just before each (so a stale answer would show): ftruncate through an open
/// descriptor (grow and shrink), truncate by path, an mmap write with msync, posix_fallocate,
/// copy_file_range, O_APPEND writes, unlink of a file still open here and its last close.
#[test]
fn review5_df_right_after_each_change_through_this_mount() {
    let Some((server, m)) = mounted_alice("review5_df_right_after_each_change_through_this_mount", Some("64M")) else {
        return;
    };
    let out = python(
        &server,
        &m,
        "import mmap\n\
         def used():\n\
         \x20   s = os.statvfs('.')\n\
         \x20   return (s.f_blocks - s.f_bfree) * s.f_frsize\n\
         def step(what, change, delta):\n\
         \x20   before = used()\n\
         \x20   assert used() == before\n\
         \x20   change()\n\
         \x20   now = used()\n\
         \x20   assert now == before + delta, (what, before, now, delta)\n\
         with open('base', 'wb') as f:\n\
         \x20   f.write(b'x' * 8192)\n\
         fd = os.open('base', os.O_RDWR)\n\
         step('ftruncate grow', lambda: os.ftruncate(fd, 1 << 20), (1 << 20) - 8192)\n\
         step('ftruncate shrink', lambda: os.ftruncate(fd, 4096), 4096 - (1 << 20))\n\
         step('pwrite through the fd', lambda: os.pwrite(fd, b'y' * 65536, 1 << 20), 65536 + (1 << 20) - 4096)\n\
         step('truncate by path', lambda: os.truncate('base', 1 << 21), (1 << 21) - (1 << 20) - 65536)\n\
         def mm():\n\
         \x20   mp = mmap.mmap(fd, 1 << 21)\n\
         \x20   mp[0:4] = b'abcd'\n\
         \x20   mp.flush()\n\
         \x20   mp.close()\n\
         step('mmap write + msync (no size change)', mm, 0)\n\
         os.close(fd)\n\
         def falloc():\n\
         \x20   g = os.open('fa', os.O_CREAT | os.O_RDWR, 0o644)\n\
         \x20   try:\n\
         \x20       os.posix_fallocate(g, 0, 1 << 20)\n\
         \x20   finally:\n\
         \x20       os.close(g)\n\
         step('posix_fallocate of a new file', falloc, 1 << 20)\n\
         def cfr():\n\
         \x20   a = os.open('base', os.O_RDONLY); b = os.open('copy', os.O_CREAT | os.O_WRONLY, 0o644)\n\
         \x20   n = 0\n\
         \x20   while n < (1 << 21):\n\
         \x20       k = os.copy_file_range(a, b, (1 << 21) - n)\n\
         \x20       assert k > 0\n\
         \x20       n += k\n\
         \x20   os.close(a); os.close(b)\n\
         step('copy_file_range 2 MiB', cfr, 1 << 21)\n\
         def app():\n\
         \x20   g = os.open('copy', os.O_WRONLY | os.O_APPEND)\n\
         \x20   os.write(g, b'z' * 12288); os.close(g)\n\
         step('O_APPEND write', app, 12288)\n\
         h = os.open('copy', os.O_RDONLY)\n\
         step('unlink while open here', lambda: os.unlink('copy'), -(1 << 21) - 12288)\n\
         step('last close of the unlinked file', lambda: os.close(h), 0)\n\
         print('ok')\n",
    );
    assert_eq!(out, "ok\n");
}

/// Sends SIGCONT to a stopped server when dropped (also when the test fails).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// A small read (sent detached: the connection's reader answers the kernel) to a server that
/// stops answering without closing the connection (SIGSTOP): the read must end, with EIO, once
/// the keepalive gives the connection up and the reconnect wait (2 s here) is over, not hang
/// `cat`; and once the server runs again, reads work.
#[test]
fn review5_a_detached_read_to_a_stopped_server_ends_with_an_error() {
    let name = "review5_a_detached_read_to_a_stopped_server_ends_with_an_error";
    if !homefs_tests::mount::fuse_available(name) {
        return;
    }
    let server = TestServer::start(name);
    server.add_user("alice", homefs_tests::mount::PASSWORD, None);
    let m = TestMount::new(&server, "alice", homefs_tests::mount::PASSWORD, "reconnect_timeout=2");
    m.sh_ok("head -c 8192 /dev/urandom > f && echo x > g && cat g > /dev/null");
    let pid = server.pid().expect("server runs");
    let stopped = Continue(pid);
    let out = std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().expect("kill");
    assert!(out.success(), "SIGSTOP the server");
    let started = std::time::Instant::now();
    let read = m.sh("timeout 90 dd if=f of=/dev/null bs=4096 count=1 iflag=direct; echo status=$?");
    let text = String::from_utf8_lossy(&read.stdout).into_owned();
    let took = started.elapsed();
    assert!(!text.contains("status=124"), "the read hung for 90 s (timeout killed it)");
    assert!(text.contains("status=1"), "the read failed (EIO) rather than answered: {text}");
    assert!(took < Duration::from_secs(60), "the read ended after {took:?}");
    drop(stopped);
    wait_until(Duration::from_secs(30), "a read to work again once the server runs", || {
        m.sh("dd if=f of=/dev/null bs=4096 count=1 iflag=direct").status.success()
    });
}
