//! Going to the background once the mount is ready, without `fork` in a threaded process: the
//! command re-runs itself as a child with [`DAEMON_CHILD_FLAG`] and its stdout on a pipe. The
//! child logs in (it may ask on the terminal, which it shares), mounts, writes [`READY_LINE`],
//! then leaves the terminal's session and points its standard streams at /dev/null. The parent
//! exits 0 on that line, or with the child's status if the child ends without it (having
//! printed its one-line reason on the shared stderr).
//!
//! The child runs with one glibc malloc arena ([`MALLOC_ENV`]), unless the user set malloc's
//! environment already.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// The hidden flag that marks the background child.
pub const DAEMON_CHILD_FLAG: &str = "--daemon-child";
/// What the child writes on its stdout once mounted.
pub const READY_LINE: &str = "homefs-mount-ready";

/// How the background child ended before it was ready.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the background process: {0}")]
    Spawn(io::Error),
    #[error("the background process failed ({0})")]
    Failed(std::process::ExitStatus),
}

/// glibc malloc's arena limit for the background child. glibc reads it only when a process
/// starts, which the re-run gives us for free. Why: glibc gives threads that allocate at once
/// their own arenas (up to 8 per core), each keeping what was freed in it, and netmount's FUSE
/// threads and tokio workers all allocate request and reply buffers. Measured with
/// `ROUNDS=1 PHASES=fs TARGETS=homefs scripts/bench.sh` (the whole fs phase, peak VmHWM, two runs
/// each): default 62.5 / 71.7 MiB (over the 64 MiB goal of issue 6), 2 arenas 50.4 / 48.9 MiB,
/// 1 arena 42.0 / 42.1 MiB, with create, rm -rf, seq write and dbench within the runs' noise.
const MALLOC_ENV: (&str, &str) = ("MALLOC_ARENA_MAX", "1");

/// Whether the user already chose malloc's settings (theirs stand).
fn malloc_set_by_user() -> bool {
    std::env::var_os(MALLOC_ENV.0).is_some() || std::env::var_os("GLIBC_TUNABLES").is_some()
}

/// Parent side: runs this program again with `args` plus [`DAEMON_CHILD_FLAG`], and waits until
/// the child says it is mounted (`Ok`) or ends (`Err`, with its exit code when it has one).
/// The wait has no deadline of its own: the child's steps are bounded (connect, login, mount),
/// except a password prompt, which waits for the user as it should.
///
/// # Errors
/// [`DaemonError`]; the child has already printed why.
pub fn spawn_and_wait_ready(args: &[OsString]) -> Result<(), (DaemonError, Option<i32>)> {
    let exe = std::env::current_exe().map_err(|e| (DaemonError::Spawn(e), None))?;
    let mut command = Command::new(exe);
    command.args(args).arg(DAEMON_CHILD_FLAG).stdout(Stdio::piped());
    if !malloc_set_by_user() {
        command.env(MALLOC_ENV.0, MALLOC_ENV.1);
    }
    let mut child = command.spawn().map_err(|e| (DaemonError::Spawn(e), None))?;
    let stdout = child.stdout.take().ok_or_else(|| (DaemonError::Spawn(io::Error::other("no pipe")), None))?;
    let mut line = String::new();
    let ready = BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim_end() == READY_LINE;
    if ready {
        return Ok(());
    }
    match child.wait() {
        Ok(status) => Err((DaemonError::Failed(status), status.code())),
        Err(e) => Err((DaemonError::Spawn(e), None)),
    }
}

/// Child side, once mounted: tells the parent, leaves the terminal's session (so a hang-up or
/// Ctrl-C there does not reach the daemon), and detaches the standard streams. With
/// `keep_stderr`, stderr stays (for `--debug` logs).
///
/// # Errors
/// When the pipe to the parent or /dev/null cannot be written or opened.
pub fn ready_and_detach(keep_stderr: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{READY_LINE}")?;
    out.flush()?;
    drop(out);
    // Fails only if we already lead a process group, which a spawned child does not.
    let _ = rustix::process::setsid();
    let null = OpenOptions::new().read(true).write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    if !keep_stderr {
        rustix::stdio::dup2_stderr(&null)?;
    }
    Ok(())
}
