//! Running the real `netcp` binary against a [`TestServer`]: with `--fingerprint` and
//! `HOMEFS_PASSWORD`, captured or spawned (to be killed part-way), plus helpers to wait for a
//! partial file to grow and to hash files.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::server::TestServer;

/// A transfer at least this large lasts seconds under [`Netcp::spawn`]'s limit (32 MiB/s, with
/// one second's burst).
pub const PACED_BYTES: u64 = 128 << 20;

/// The `netcp` binary built beside the test binary (`target/debug/netcp`).
///
/// # Panics
/// When it has not been built (`cargo build --workspace --bins`).
pub fn netcp_bin() -> PathBuf {
    crate::server::binary("netcp")
}

/// A fresh server with one user, and netcp as that user. A first login (an empty shell session)
/// makes the user's home, so tests can look at it or put files in it behind the server's back.
pub fn server_with_user(test: &str, user: &str, password: &str, quota: Option<&str>) -> (TestServer, Netcp) {
    let server = TestServer::start(test);
    server.add_user(user, password, quota);
    let netcp = Netcp::new(&server, user, password);
    let dir = tempfile::tempdir().expect("tempdir");
    netcp.shell("pwd\n", dir.path()).ok();
    (server, netcp)
}

/// One user's view of a server, through netcp.
pub struct Netcp {
    /// `user@127.0.0.1:PORT`
    pub server: String,
    pub fingerprint: String,
    pub password: String,
}

/// A finished run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Fails the test, showing the output, unless the run exited 0.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "netcp failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Netcp {
    /// netcp as `user` (password `password`) on `server`.
    pub fn new(server: &TestServer, user: &str, password: &str) -> Netcp {
        Netcp {
            server: format!("{user}@127.0.0.1:{}", server.addr.port()),
            fingerprint: server.fingerprint.clone(),
            password: password.to_string(),
        }
    }

    /// `user@127.0.0.1:PORT:PATH` with `path`'s bytes unchanged.
    pub fn remote(&self, path: impl AsRef<[u8]>) -> OsString {
        let mut v = format!("{}:", self.server).into_bytes();
        v.extend_from_slice(path.as_ref());
        OsString::from_vec(v)
    }

    /// A `netcp` command with the login set up; the caller adds the arguments.
    pub fn command(&self) -> Command {
        let mut c = Command::new(netcp_bin());
        c.env("HOMEFS_PASSWORD", &self.password)
            .env_remove("NETCP_LOG")
            .arg("--fingerprint")
            .arg(&self.fingerprint)
            .stdin(Stdio::null());
        c
    }

    /// Runs `netcp ARGS...` to the end (bounded by `deadline`), capturing its output.
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command();
        c.args(args);
        run_bounded(c, Duration::from_secs(300))
    }

    /// As [`Netcp::run`], with netcp's debug log on stderr (`NETCP_LOG=netcp=debug`): its last
    /// line names the requests sent, by kind (the run's round trips).
    pub fn run_logged<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command();
        c.env("NETCP_LOG", "netcp=debug").args(args);
        run_bounded(c, Duration::from_secs(300))
    }

    /// Starts `netcp --bwlimit 32M ARGS...` without waiting, to be killed part-way: the limit
    /// keeps a transfer of [`PACED_BYTES`] or more going for seconds after the test saw it
    /// start, however fast the machine (a 256 MiB put took 1.5 s unpaced, and finished before
    /// a server restart meant to interrupt it).
    pub fn spawn<I, S>(&self, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command();
        c.args(["--bwlimit", "32M"]).args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        c.spawn().expect("netcp starts")
    }

    /// [`Netcp::spawn`], capturing its output for [`wait_output`].
    pub fn spawn_captured<I, S>(&self, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command();
        c.args(["--bwlimit", "32M"]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().expect("netcp starts")
    }

    /// `netcp shell SERVER` with `--fingerprint`, reading `script` on stdin (a pipe).
    pub fn shell(&self, script: &str, cwd: &Path) -> Run {
        let mut c = Command::new(netcp_bin());
        c.env("HOMEFS_PASSWORD", &self.password).current_dir(cwd).args([
            "shell",
            "--fingerprint",
            &self.fingerprint,
            &self.server,
        ]);
        run_with_input(c, script.as_bytes(), Duration::from_secs(120))
    }

    /// `netcp ARGS...` run on a pseudo-terminal through `script -qfec CMD /dev/null` (util-linux),
    /// with `input` on its stdin. Returns everything the terminal showed.
    pub fn on_pty(&self, args: &[&str], input: &str, cwd: &Path) -> Run {
        run_with_input(self.pty_command(args, cwd), input.as_bytes(), Duration::from_secs(120))
    }

    /// Like [`Netcp::on_pty`] for an interactive shell: types each of `lines` only once the line
    /// editor is waiting for it (it turns on bracketed paste, `ESC[?2004h`, at each prompt), as a
    /// person would; then closes the input and waits for the end.
    pub fn on_pty_typed(&self, args: &[&str], lines: &[&str], cwd: &Path) -> Run {
        const PROMPT_READY: &str = "\x1b[?2004h";
        let mut c = self.pty_command(args, cwd);
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("script starts");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        for (i, line) in lines.iter().enumerate() {
            while String::from_utf8_lossy(&seen).matches(PROMPT_READY).count() <= i {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(chunk) => seen.extend_from_slice(&chunk),
                    Err(_) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "no prompt {} before typing {line:?}; screen: {}",
                            i + 1,
                            String::from_utf8_lossy(&seen)
                        );
                    }
                }
            }
            use std::io::Write;
            stdin.write_all(line.as_bytes()).expect("type a line");
            stdin.write_all(b"\r").expect("type enter");
            stdin.flush().expect("flush");
        }
        drop(stdin);
        let mut run = wait_output_with(child, Duration::from_secs(120), None);
        while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(5)) {
            seen.extend_from_slice(&chunk);
        }
        let _ = reader.join();
        run.stdout = String::from_utf8_lossy(&seen).into_owned();
        run
    }

    fn pty_command(&self, args: &[&str], cwd: &Path) -> Command {
        // The login flags go last, so that they belong to the `shell` subcommand when there is one.
        let mut cmdline = format!("{} ", shell_quote(netcp_bin().as_os_str()));
        for a in args {
            cmdline.push_str(&shell_quote(OsStr::new(a)));
            cmdline.push(' ');
        }
        cmdline.push_str("--fingerprint ");
        cmdline.push_str(&shell_quote(OsStr::new(&self.fingerprint)));
        let mut c = Command::new("script");
        // The shell keeps its history under XDG_STATE_HOME: the test's directory, not the machine's.
        c.env("HOMEFS_PASSWORD", &self.password)
            .env("XDG_STATE_HOME", cwd)
            .env("TERM", "xterm")
            .current_dir(cwd)
            .args(["-qfec", &cmdline, "/dev/null"]);
        c
    }
}

/// Quotes a word for `sh -c`.
pub fn shell_quote(s: &OsStr) -> String {
    format!("'{}'", String::from_utf8_lossy(s.as_bytes()).replace('\'', r"'\''"))
}

pub fn run_bounded(mut c: Command, limit: Duration) -> Run {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("netcp starts");
    wait_output(child, limit)
}

fn run_with_input(mut c: Command, input: &[u8], limit: Duration) -> Run {
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("command starts");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    // A writer thread, so a child that stops reading cannot block the test.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let run = wait_output(child, limit);
    let _ = writer.join();
    run
}

/// Waits for the child's exit and output (piped), killing it after `limit`.
pub fn wait_output(mut child: Child, limit: Duration) -> Run {
    let out = child.stdout.take().expect("stdout is piped");
    wait_output_with(child, limit, Some(out))
}

/// Waits for the child's exit, collecting `out` (if given) and its stderr; kills it after `limit`.
fn wait_output_with(mut child: Child, limit: Duration, out: Option<std::process::ChildStdout>) -> Run {
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut out) = out {
            let _ = out.read_to_end(&mut v);
        }
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The partial files (`*.homefs-part`) in `dir`.
pub fn partial_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().map(|e| e.path()).filter(|p| p.as_os_str().as_bytes().ends_with(b".homefs-part")).collect()
}

/// Polls (every 5 ms, up to `limit`) until a partial file in `dir` is larger than `min` bytes,
/// and returns its path. Panics naming what it waited for, or if `child` exits first.
pub fn wait_for_partial(dir: &Path, min: u64, child: &mut Child, limit: Duration) -> PathBuf {
    let deadline = Instant::now() + limit;
    loop {
        for p in partial_files(dir) {
            if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) > min {
                return p;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("netcp exited ({status}) before a partial file in {} passed {min} bytes: {err}", dir.display());
        }
        assert!(Instant::now() < deadline, "no partial file in {} passed {min} bytes within {limit:?}", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// BLAKE3 of a file's content.
pub fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// Writes `len` pseudo-random bytes (seeded) to `path`.
pub fn write_random(path: &Path, len: u64, seed: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// The number after `resumed at ` in a summary line, if any.
pub fn resumed_at(stdout: &str) -> Option<u64> {
    let rest = stdout.split("resumed at ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The number before ` bytes sent` in a summary line, if any.
pub fn bytes_sent(stdout: &str) -> Option<u64> {
    let before = stdout.split(" bytes sent").next()?;
    before.rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
