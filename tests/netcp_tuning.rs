//! netcp's process settings: it runs with fsd's glibc malloc settings (one arena, fixed mmap and
//! trim thresholds; without them every 256 KiB frame of a get was faulted in afresh), set by
//! re-executing itself, and keeps the user's own malloc environment when there is one.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use homefs_tests::mount::poll_until;
use homefs_tests::netcp::{netcp_bin, server_with_user, Netcp};

const PASSWORD: &str = "correct horse";

/// How long a shell may take to log in (argon2 with the tests' light parameters, TLS, a debug build).
const LOGIN_WAIT: Duration = Duration::from_secs(60);

/// Starts `netcp shell` with `env` added to its environment (malloc's variables removed first),
/// waits until it has logged in, and returns it with its environment as the kernel has it.
fn logged_in_shell(netcp: &Netcp, env: &[(&str, &str)]) -> (Child, Vec<String>) {
    let mut c = Command::new(netcp_bin());
    for var in ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"] {
        c.env_remove(var);
    }
    c.env("HOMEFS_PASSWORD", &netcp.password)
        .env_remove("NETCP_LOG")
        .envs(env.iter().copied())
        .args(["shell", "--fingerprint", &netcp.fingerprint, &netcp.server])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("netcp shell starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let Ok(line) = rx.recv_timeout(LOGIN_WAIT) else {
        let _ = child.kill();
        panic!("waited {LOGIN_WAIT:?} for netcp shell's login line");
    };
    assert_eq!(line.trim_end(), "201 logged in as alice");
    // Logged in, so past its start (and any re-exec): the same pid, running for good now.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).expect("environ of the running shell");
    let vars = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    (child, vars)
}

/// Ends the shell with `exit` and checks that it ended well (polled, within [`LOGIN_WAIT`]).
fn finish(mut child: Child) {
    child.stdin.take().expect("piped stdin").write_all(b"exit\n").expect("exit sent");
    let mut status = None;
    if !poll_until(LOGIN_WAIT, || {
        status = child.try_wait().expect("wait for netcp");
        status.is_some()
    }) {
        let _ = child.kill();
        panic!("waited {LOGIN_WAIT:?} for netcp shell to end after exit");
    }
    let status = status.expect("ended");
    assert!(status.success(), "netcp shell ended with {status}");
}

#[test]
fn netcp_runs_with_fsds_malloc_settings() {
    let (_server, netcp) = server_with_user("netcp_runs_with_fsds_malloc_settings", "alice", PASSWORD, None);
    let (child, vars) = logged_in_shell(&netcp, &[]);
    for want in ["MALLOC_ARENA_MAX=1", "MALLOC_MMAP_THRESHOLD_=8388608", "MALLOC_TRIM_THRESHOLD_=33554432"] {
        assert!(vars.iter().any(|v| v == want), "{want} in netcp's environment: {vars:?}");
    }
    assert!(vars.iter().any(|v| v.starts_with("HOMEFS_PASSWORD=")), "the rest of the environment is kept");
    finish(child);
}

#[test]
fn netcp_keeps_the_users_malloc_settings() {
    let (_server, netcp) = server_with_user("netcp_keeps_the_users_malloc_settings", "alice", PASSWORD, None);
    let (child, vars) = logged_in_shell(&netcp, &[("MALLOC_ARENA_MAX", "4")]);
    assert!(vars.iter().any(|v| v == "MALLOC_ARENA_MAX=4"), "the user's setting stands: {vars:?}");
    assert!(!vars.iter().any(|v| v.starts_with("MALLOC_TRIM_THRESHOLD_=")), "nothing added: {vars:?}");
    finish(child);
}
