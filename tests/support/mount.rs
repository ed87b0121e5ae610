//! [`TestMount`]: the real `netmount` binary mounting a [`TestServer`] user's home on a temp dir
//! (it returns once mounted); shell commands run in it with `sh -c`; `Drop` unmounts with
//! `fusermount3 -u` (bounded) and checks that nothing stays mounted.

use crate::server::{binary, TestServer};
use homefs_mount::fuse::mountpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `netmount` may take to log in, mount and return.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one shell command in a test may run.
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why FUSE tests cannot run here, if they cannot.
pub fn fuse_missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    if Command::new("fusermount3").arg("-V").output().is_err() {
        return Some("fusermount3 is not installed".into());
    }
    None
}

/// Whether FUSE tests can run; prints why `name` is skipped when not. Under
/// `HOMEFS_REQUIRE_FUSE=1` a missing FUSE is a failure instead.
///
/// # Panics
/// When FUSE is missing and `HOMEFS_REQUIRE_FUSE=1`.
pub fn fuse_available(name: &str) -> bool {
    match fuse_missing() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("HOMEFS_REQUIRE_FUSE").as_deref() != Ok("1"),
                "{name}: {why} (HOMEFS_REQUIRE_FUSE=1)"
            );
            eprintln!("{name}: skipped: {why}");
            false
        }
    }
}

/// Runs `cmd` to completion, killing it past `timeout`.
///
/// # Panics
/// When it cannot be started or does not finish in time (naming `what`).
pub fn output_within(mut cmd: Command, timeout: Duration, what: &str) -> Output {
    let tmp = tempfile::tempdir().expect("temp dir for output");
    let (out_path, err_path) = (tmp.path().join("out"), tmp.path().join("err"));
    let out = std::fs::File::create(&out_path).expect("create stdout file");
    let err = std::fs::File::create(&err_path).expect("create stderr file");
    // Output goes to files, not pipes: a daemon that inherits them cannot keep us waiting.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: did not finish within {timeout:?}");
            }
            Err(e) => panic!("{what}: wait: {e}"),
        }
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// Waits for `child`, already running with its stdout and stderr piped, to finish; kills it past
/// `timeout`.
///
/// # Panics
/// When it does not finish in time, or cannot be waited for (naming `what`).
pub fn child_output_within(child: std::process::Child, timeout: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: wait: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            panic!("{what}: did not finish within {timeout:?}");
        }
    }
}

/// A `netmount` command for `user` of `server` on `mountpoint` (password in `HOMEFS_PASSWORD`,
/// certificate pinned by `--fingerprint`), with `extra` arguments.
pub fn netmount_command(server: &TestServer, user: &str, password: &str, mountpoint: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("netmount"));
    cmd.arg(format!("{user}@{}", server.addr))
        .arg(mountpoint)
        .args(["--fingerprint", &server.fingerprint])
        .args(extra)
        .env("HOMEFS_PASSWORD", password);
    cmd
}

/// A mounted home.
pub struct TestMount {
    /// The mountpoint.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestMount {
    /// Mounts `user`'s home with `options` given to `-o` (none if empty).
    ///
    /// # Panics
    /// When netmount fails or returns without the mount being there.
    pub fn new(server: &TestServer, user: &str, password: &str, options: &str) -> TestMount {
        let dir = tempfile::Builder::new().prefix(&format!("homefs-mnt-{user}-")).tempdir().expect("temp dir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("create mountpoint");
        let mut extra = Vec::new();
        if !options.is_empty() {
            extra.extend(["-o", options]);
        }
        let out = output_within(netmount_command(server, user, password, &path, &extra), MOUNT_TIMEOUT, "netmount");
        assert!(
            out.status.success(),
            "netmount failed ({}): {}\nserver stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            server.stderr_log()
        );
        assert!(is_mounted(&path), "netmount returned 0 but {} is not mounted", path.display());
        TestMount { path, _dir: dir }
    }

    /// The pid of the netmount daemon serving this mount (found by its command line).
    ///
    /// # Panics
    /// When there is not exactly one.
    pub fn daemon_pid(&self) -> u32 {
        daemon_pid(&self.path)
    }

    /// Bytes the daemon has read and written so far (`rchar + wchar` of /proc/PID/io: its
    /// socket and /dev/fuse traffic).
    pub fn daemon_io_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.daemon_pid())).expect("read /proc/PID/io");
        io.lines()
            .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    }

    /// A path inside the mount.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Runs `script` with `sh -c` in the mount's root.
    pub fn sh(&self, script: &str) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).current_dir(&self.path);
        output_within(cmd, SHELL_TIMEOUT, script)
    }

    /// As [`TestMount::sh`], and returns stdout.
    ///
    /// # Panics
    /// When the script fails, with its stderr.
    pub fn sh_ok(&self, script: &str) -> String {
        stdout_of_success(script, self.sh(script))
    }

    /// Unmounts with `fusermount3 -u`, waiting (bounded) until the kernel no longer lists it.
    ///
    /// # Panics
    /// When unmounting fails or the mount stays.
    pub fn unmount(&self) {
        if is_mounted(&self.path) {
            mountpoint::unmount(&self.path, false).unwrap_or_else(|e| panic!("unmount {}: {e}", self.path.display()));
        }
        wait_until(Duration::from_secs(10), &format!("{} to be unmounted", self.path.display()), || {
            !is_mounted(&self.path)
        });
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        let result = mountpoint::unmount(&self.path, false).or_else(|_| mountpoint::unmount(&self.path, true));
        if !std::thread::panicking() {
            if let Err(e) = result {
                panic!("unmount {}: {e}", self.path.display());
            }
            wait_until(Duration::from_secs(10), "the mount to go", || !is_mounted(&self.path));
        }
    }
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mountpoint::is_mount_point(&abs).unwrap_or(false)
}

/// Polls `cond` until it holds or `timeout` passes; whether it held.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` until it holds.
///
/// # Panics
/// When it does not hold within `timeout`, naming what was waited for.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(poll_until(timeout, cond), "timed out after {timeout:?} waiting for {what}");
}

/// The password test users get.
pub const PASSWORD: &str = "correct horse battery";

/// A server named `name` with user `alice` (quota `quota`, if any) and her home mounted; `None`
/// (having said why) when FUSE is not available. Bind as `let (server, mount) = ...` so the
/// mount is dropped (unmounted) before the server.
pub fn mounted_alice(name: &str, quota: Option<&str>) -> Option<(TestServer, TestMount)> {
    if !fuse_available(name) {
        return None;
    }
    let server = TestServer::start(name);
    server.add_user("alice", PASSWORD, quota);
    let mount = TestMount::new(&server, "alice", PASSWORD, "");
    Some((server, mount))
}

/// A server named `name` with alice's home mounted twice (as on two machines); `None` (having
/// said why) when FUSE is not available.
pub fn alice_twice(name: &str) -> Option<(TestServer, TestMount, TestMount)> {
    let (server, a) = mounted_alice(name, None)?;
    let b = TestMount::new(&server, "alice", PASSWORD, "");
    Some((server, a, b))
}

/// The pid of the netmount daemon serving `mountpoint` (its command line names the mountpoint
/// and the hidden background flag).
///
/// # Panics
/// When there is not exactly one.
pub fn daemon_pid(mountpoint: &Path) -> u32 {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"netmount"))
            && args.contains(&want)
            && args.contains(&&b"--daemon-child"[..]);
        if is_daemon {
            pids.push(pid);
        }
    }
    assert_eq!(pids.len(), 1, "one netmount daemon for {}: {pids:?}", mountpoint.display());
    pids[0]
}

/// A mount served by `netmount -f` in the foreground, its log kept in a file, so a test can read
/// the round trips it cost: [`LoggedMount::counts`] asks the daemon (SIGUSR1) for its counts so far.
pub struct LoggedMount {
    /// The mountpoint.
    pub path: PathBuf,
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Round trips by request kind (`stat`, `readdir`, ...), as the client counts them.
pub type Counts = std::collections::HashMap<String, u64>;

impl LoggedMount {
    /// Mounts `user`'s home with `options` given to `-o` (none if empty), in the foreground.
    ///
    /// # Panics
    /// When netmount exits or the mount does not appear within [`MOUNT_TIMEOUT`].
    pub fn new(server: &TestServer, user: &str, password: &str, options: &str) -> LoggedMount {
        let dir = tempfile::Builder::new().prefix(&format!("homefs-lmnt-{user}-")).tempdir().expect("temp dir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("create mountpoint");
        let log = dir.path().join("netmount.log");
        let mut extra = vec!["-f"];
        if !options.is_empty() {
            extra.extend(["-o", options]);
        }
        let mut cmd = netmount_command(server, user, password, &path, &extra);
        cmd.env("RUST_LOG", "homefs_mount=info,netmount=info,warn").env("NO_COLOR", "1");
        let stderr = std::fs::File::create(&log).expect("create the log");
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().expect("start netmount -f");
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        // Mounted, and change notices subscribed to (or refused): logged after the mount.
        let ready = |log: &Path| {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            text.contains("change notices on") || text.contains("sends no change notices")
        };
        while !(is_mounted(&path) && ready(&log)) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("netmount -f exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("netmount -f did not mount within {MOUNT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        LoggedMount { path, child, log, _dir: dir }
    }

    /// A path inside the mount.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server sends change notices to this mount.
    pub fn notices_on(&self) -> bool {
        self.log().contains("change notices on")
    }

    /// Runs `script` with `sh -c` in the mount's root and returns stdout.
    ///
    /// # Panics
    /// When the script fails, with its stderr.
    pub fn sh_ok(&self, script: &str) -> String {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).current_dir(&self.path);
        stdout_of_success(script, output_within(cmd, SHELL_TIMEOUT, script))
    }

    /// The requests answered from the cache so far, by kind (`lookup`, `unlink_behind`, ...), as
    /// of the last [`LoggedMount::counts`].
    pub fn hits(&self) -> Counts {
        let log = self.log();
        let Some(line) = log.lines().rfind(|l| l.contains("counts so far")) else { return Counts::new() };
        parse_field(line, "hits=", " notices=")
    }

    /// One kind of [`LoggedMount::hits`] (0 when none).
    pub fn hit(&self, kind: &str) -> u64 {
        self.hits().get(kind).copied().unwrap_or(0)
    }

    /// Unmounts and waits (bounded) for the daemon to exit; returns its log.
    ///
    /// # Panics
    /// When unmounting fails or the daemon is still running 60 s later.
    pub fn stop(&mut self) -> String {
        if is_mounted(&self.path) {
            mountpoint::unmount(&self.path, false).unwrap_or_else(|e| panic!("unmount {}: {e}", self.path.display()));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => panic!("netmount -f still running 60 s after the unmount:\n{}", self.log()),
                Err(e) => panic!("wait for netmount -f: {e}"),
            }
        }
        self.log()
    }

    /// The round trips so far, by kind: the daemon logs them on SIGUSR1.
    ///
    /// # Panics
    /// When the daemon does not log them within 10 s.
    pub fn counts(&self) -> Counts {
        let before = self.log().matches("counts so far").count();
        let mut kill = Command::new("kill");
        kill.args(["-USR1", &self.child.id().to_string()]);
        let out = output_within(kill, Duration::from_secs(10), "kill -USR1 netmount");
        assert!(out.status.success(), "kill -USR1: {}", String::from_utf8_lossy(&out.stderr));
        let mut line = String::new();
        wait_until(Duration::from_secs(10), "netmount to log its counts after SIGUSR1", || {
            let log = self.log();
            match log.lines().filter(|l| l.contains("counts so far")).nth(before) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        });
        parse_counts(&line)
    }
}

/// The `requests=` field of a "counts so far" log line: `kind=n` pairs up to the next field.
fn parse_counts(line: &str) -> Counts {
    parse_field(line, "requests=", " hits=")
}

/// The `kind=n` pairs of a log line between `field` and `next`.
fn parse_field(line: &str, field: &str, next: &str) -> Counts {
    let Some(start) = line.find(field) else { return Counts::new() };
    let rest = &line[start + field.len()..];
    let end = rest.find(next).unwrap_or(rest.len());
    rest[..end]
        .split_whitespace()
        .filter_map(|kv| {
            let (k, n) = kv.split_once('=')?;
            Some((k.to_string(), n.parse().ok()?))
        })
        .collect()
}

/// `after - before` for one kind.
pub fn delta(before: &Counts, after: &Counts, kind: &str) -> u64 {
    after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0)
}

impl Drop for LoggedMount {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = mountpoint::unmount(&self.path, false).or_else(|_| mountpoint::unmount(&self.path, true));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if !std::thread::panicking() {
            wait_until(Duration::from_secs(10), "the logged mount to go", || !is_mounted(&self.path));
        }
    }
}

/// `out`'s stdout.
///
/// # Panics
/// When `script` failed, with its stdout and stderr.
fn stdout_of_success(script: &str, out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "`{script}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The prelude of the python scripts that tests run in a mount: `H` the user's home on the
/// server (argv[1]), `W` the flags of a new file, `srv(p)` a path there, `rd(p)` / `here(p)` the
/// bytes of a file there / here, `sh(c)` a shell command's output, `until` waits (bounded) for a
/// condition and fails naming it.
pub const PY_PRELUDE: &str = "import os, sys, errno, mmap, signal, stat, subprocess, tempfile, time\n\
H = sys.argv[1]\n\
W = os.O_CREAT | os.O_WRONLY\n\
def srv(p):\n    return os.path.join(H, p)\n\
def rd(p):\n    with open(srv(p), 'rb') as f:\n        return f.read()\n\
def here(p):\n    with open(p, 'rb') as f:\n        return f.read()\n\
def sh(c):\n    return subprocess.run(c, shell=True, check=True, capture_output=True, text=True).stdout\n\
def until(what, cond, secs=10):\n    end = time.time() + secs\n    while not cond():\n        \
if time.time() > end:\n            raise AssertionError('waited 10 s for: ' + what)\n        time.sleep(0.02)\n";

/// Runs `body` (after [`PY_PRELUDE`]) with python3 in the mount's root, with `user`'s home on
/// the server as its argument; returns its stdout.
///
/// # Panics
/// When the script fails.
pub fn python(server: &TestServer, m: &TestMount, user: &str, body: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("test.py");
    std::fs::write(&path, format!("{PY_PRELUDE}{body}")).expect("write the script");
    let home = server.home_path(user);
    m.sh_ok(&format!("python3 {} {}", path.display(), home.display()))
}

/// The names in `dir` on the server's disk, sorted (none when it does not exist).
pub fn names_on_server(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A file on the server's disk made immutable (`chattr +i`), so that the server's unlink of it
/// fails; made mutable again on drop.
pub struct Immutable(PathBuf);

impl Immutable {
    /// `None`, with the reason printed for `test`, where the file system cannot.
    pub fn set(test: &str, path: &Path) -> Option<Immutable> {
        match Command::new("chattr").arg("+i").arg(path).output() {
            Ok(o) if o.status.success() => Some(Immutable(path.to_path_buf())),
            other => {
                eprintln!("{test}: skipped: chattr +i: {other:?}");
                None
            }
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}
