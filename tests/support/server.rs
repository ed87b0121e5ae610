//! [`TestServer`]: a real `fsd` binary serving a fresh instance on an ephemeral loopback port, in
//! a temp dir named after the test; its helpers add users, restart the server, and connect
//! clients through the real client library with the certificate pinned. `Drop` kills and reaps
//! the server.

use homefs_mount::client::{Client, ConnectError, ConnectOptions, PasswordFn, ServerAddr, Trust};
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long `fsd serve` may take to print its two ready lines.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a running server may take to notice a changed users file (it polls every second).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// The reconnect timeout of test clients: long enough for a server restart on a loaded machine.
pub const TEST_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of one of the workspace's binaries, built beside the test binary
/// (`target/debug/deps/e2e-*` → `target/debug/NAME`).
///
/// # Panics
/// When the binary is missing, saying how to build it (cargo builds a dependency's binaries
/// only for its own tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let dir = exe.parent().and_then(Path::parent).expect("the test binary lives in target/PROFILE/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first (cargo build --workspace --bins)", path.display());
    path
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// A password source for the client library.
pub fn password(pw: &str) -> PasswordFn {
    let pw = pw.to_string();
    Box::new(move || Ok(pw))
}

/// How to set up a test server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Run as root, switching to `nobody` (the instance's tree is chowned to it).
    pub run_as_nobody: bool,
    /// Extra settings: (section, key, TOML value), e.g. `("limits", "idle_timeout_secs", "2")`.
    /// Section `""` is the top level.
    pub settings: Vec<(String, String, String)>,
}

impl ServerOptions {
    /// Adds one setting.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> ServerOptions {
        self.settings.push((section.into(), key.into(), value.into()));
        self
    }
}

/// A running `fsd serve` of its own instance.
pub struct TestServer {
    /// The instance directory (fsd.toml, users.toml, homes/, ...).
    pub dir: PathBuf,
    /// `dir/fsd.toml`.
    pub config: PathBuf,
    /// Where it listens (the same across restarts).
    pub addr: SocketAddr,
    /// Its certificate fingerprint, `SHA256:...`.
    pub fingerprint: String,
    run_as_nobody: bool,
    child: Option<Child>,
    stderr_path: PathBuf,
    // Last: removed after the server is gone.
    _temp: tempfile::TempDir,
}

impl TestServer {
    /// An instance with light argon2 parameters, served on 127.0.0.1 on a free port.
    ///
    /// # Panics
    /// When any step fails, with the server's stderr.
    pub fn start(name: &str) -> TestServer {
        TestServer::start_with(name, ServerOptions::default())
    }

    /// As [`TestServer::start`], run as root switching to `nobody`. Returns `None` (and says
    /// why) when not root, unless `HOMEFS_REQUIRE_FUSE=1`, under which that is a failure.
    pub fn start_as_nobody(name: &str) -> Option<TestServer> {
        if !is_root() {
            assert!(
                std::env::var("HOMEFS_REQUIRE_FUSE").as_deref() != Ok("1"),
                "{name}: needs root (HOMEFS_REQUIRE_FUSE=1 forbids skipping)"
            );
            eprintln!("{name}: skipped: needs root to switch to nobody");
            return None;
        }
        Some(TestServer::start_with(name, ServerOptions { run_as_nobody: true, ..Default::default() }))
    }

    /// An instance with the given options.
    ///
    /// # Panics
    /// As [`TestServer::start`].
    pub fn start_with(name: &str, opts: ServerOptions) -> TestServer {
        let temp = tempfile::Builder::new().prefix(&format!("homefs-{name}-")).tempdir().expect("create a temp dir");
        let dir = temp.path().join("fsd");
        let out = Command::new(binary("fsd"))
            .args(["init".as_ref(), dir.as_os_str(), "--listen".as_ref(), "127.0.0.1:0".as_ref()])
            .output()
            .expect("run fsd init");
        assert!(out.status.success(), "fsd init failed: {}", String::from_utf8_lossy(&out.stderr));
        let config = dir.join("fsd.toml");
        let mut text = fs::read_to_string(&config).expect("read fsd.toml");
        let run_as = if opts.run_as_nobody { "\"nobody\"" } else { "\"\"" };
        text = set_key(&text, "", "run_as", run_as);
        text = set_key(&text, "auth", "argon2_memory_kib", "64");
        text = set_key(&text, "auth", "argon2_iterations", "1");
        for (section, key, value) in &opts.settings {
            text = set_key(&text, section, key, value);
        }
        fs::write(&config, text).expect("write fsd.toml");
        let stderr_path = temp.path().join("fsd.stderr");
        let mut server = TestServer {
            dir,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            fingerprint: String::new(),
            run_as_nobody: opts.run_as_nobody,
            child: None,
            stderr_path,
            _temp: temp,
        };
        server.fix_owner();
        server.spawn("127.0.0.1:0");
        server
    }

    /// Gives the whole temp tree to `nobody` when the server runs as it (so it can traverse the
    /// temp dir, read its files and reload the users file that root-run commands rewrote).
    fn fix_owner(&self) {
        if !self.run_as_nobody {
            return;
        }
        let root = self._temp.path();
        let out = Command::new("chown").arg("-R").arg("nobody:").arg(root).output().expect("run chown");
        assert!(out.status.success(), "chown -R nobody {}: {}", root.display(), String::from_utf8_lossy(&out.stderr));
    }

    fn spawn(&mut self, listen: &str) {
        let stderr = fs::OpenOptions::new().create(true).append(true).open(&self.stderr_path).expect("open stderr log");
        let mut child = Command::new(binary("fsd"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .args(["--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn fsd serve");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        // Reads the ready lines, then keeps draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        addr =
                            Some(a.trim().parse::<SocketAddr>().unwrap_or_else(|e| panic!("bad address {a:?}: {e}")));
                    } else if let Some(f) = line.strip_prefix("fingerprint ") {
                        fingerprint = Some(f.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "fsd serve did not print its ready lines within {START_TIMEOUT:?}; stderr:\n{}",
                        self.stderr_log()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!("fsd serve exited ({status:?}) before it was ready; stderr:\n{}", self.stderr_log())
                }
            }
        }
        self.addr = addr.expect("loop ends with both");
        self.fingerprint = fingerprint.expect("loop ends with both");
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, as a crash) and reaps it. Live clients see their connection die.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Serves the same instance again on the same address (after [`TestServer::stop`]).
    ///
    /// # Panics
    /// When it does not come up, with its stderr.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again while the server runs");
        let fingerprint = self.fingerprint.clone();
        self.spawn(&self.addr.to_string());
        assert_eq!(self.fingerprint, fingerprint, "the certificate changed across a restart");
    }

    /// Kills and starts the server again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Everything the server wrote to stderr (all runs).
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The directory of `user`'s home on the server's disk.
    pub fn home_path(&self, user: &str) -> PathBuf {
        self.dir.join("homes").join(user)
    }

    /// How many times the running server logged a reload of the users file.
    fn reloads(&self) -> usize {
        self.stderr_log().matches("users file reloaded").count()
    }

    /// Runs `fsd ARGS... --config F` with `stdin` as its standard input. After a successful
    /// `fsd user add|passwd|del|quota`, waits until the running server has reloaded the users
    /// file, so the change is in force when this returns.
    pub fn fsd(&self, args: &[&str], stdin: &str) -> Output {
        let changes_users = args.first() == Some(&"user") && args.get(1).is_some_and(|a| *a != "list");
        let reloads_before = self.reloads();
        let mut child = Command::new(binary("fsd"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run fsd {args:?}: {e}"));
        if let Some(mut i) = child.stdin.take() {
            // An early exit closes the pipe; its status below says why.
            let _ = i.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("wait for fsd {args:?}: {e}"));
        self.fix_owner();
        if changes_users && out.status.success() && self.child.is_some() {
            let deadline = Instant::now() + RELOAD_TIMEOUT;
            while self.reloads() <= reloads_before {
                assert!(
                    Instant::now() < deadline,
                    "fsd {args:?}: the server did not log `users file reloaded` within {RELOAD_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        out
    }

    /// As [`TestServer::fsd`], and returns stdout.
    ///
    /// # Panics
    /// When the command fails, with its stderr.
    pub fn fsd_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.fsd(args, stdin);
        assert!(out.status.success(), "fsd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `fsd user add NAME --password-stdin [--quota SIZE]`.
    pub fn add_user(&self, name: &str, password: &str, quota: Option<&str>) {
        let mut args = vec!["user", "add", name, "--password-stdin"];
        if let Some(q) = quota {
            args.extend(["--quota", q]);
        }
        self.fsd_ok(&args, &format!("{password}\n"));
    }

    /// `fsd user passwd NAME --password-stdin`.
    pub fn set_password(&self, name: &str, password: &str) {
        self.fsd_ok(&["user", "passwd", name, "--password-stdin"], &format!("{password}\n"));
    }

    /// `fsd user del NAME`.
    pub fn del_user(&self, name: &str) {
        self.fsd_ok(&["user", "del", name], "");
    }

    /// `fsd user list`.
    pub fn user_list(&self) -> String {
        self.fsd_ok(&["user", "list"], "")
    }

    /// Client options for `user`, trusting this server's fingerprint, never asking.
    pub fn options(&self, user: &str) -> ConnectOptions {
        ConnectOptions {
            server: ServerAddr { user: Some(user.into()), host: self.addr.ip().to_string(), port: self.addr.port() },
            user: user.into(),
            trust: Trust::Fingerprint(self.fingerprint.clone()),
            interactive: false,
            reconnect_timeout: TEST_RECONNECT_TIMEOUT,
            max_in_flight: 64,
            client_name: "homefs-tests".into(),
        }
    }

    /// Connects and logs in.
    ///
    /// # Errors
    /// The client's [`ConnectError`].
    pub async fn try_connect(&self, user: &str, pw: &str) -> Result<Client, ConnectError> {
        Client::connect(self.options(user), password(pw)).await
    }

    /// Connects and logs in.
    ///
    /// # Panics
    /// When that fails, with the server's stderr.
    pub async fn connect(&self, user: &str, pw: &str) -> Client {
        match self.try_connect(user, pw).await {
            Ok(c) => c,
            Err(e) => panic!("connect as {user}: {e}; server stderr:\n{}", self.stderr_log()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `text` (a TOML file as `fsd init` writes it, one `key = value` per line) with `key` in
/// `[section]` (`""`: before any section) set to `value`; a missing key is added at the section's
/// start.
fn set_key(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut done = false;
    let line_for = format!("{key} = {value}");
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            if !done && current == section {
                out.push(line_for.clone());
                done = true;
            }
            current = t.trim_matches(['[', ']']).trim().to_string();
        } else if !done && current == section && t.split('=').next().map(str::trim) == Some(key) && !t.starts_with('#')
        {
            out.push(line_for.clone());
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        if current != section {
            out.push(format!("[{section}]"));
        }
        out.push(line_for);
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::set_key;

    #[test]
    fn sets_keys_in_sections() {
        let t = "run_as = \"x\"\n[auth]\n# a = 1\na = 2\n[log]\nfile = \"\"\n";
        let t = set_key(t, "auth", "a", "3");
        let t = set_key(t.as_str(), "", "run_as", "\"\"");
        let t = set_key(t.as_str(), "log", "b", "4");
        assert_eq!(t, "run_as = \"\"\n[auth]\n# a = 1\na = 3\n[log]\nfile = \"\"\nb = 4\n");
    }
}
