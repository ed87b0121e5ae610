//! Helpers for fsd's session tests: an instance made by `fsd init` with light argon2 costs, an
//! in-process server on 127.0.0.1:0, the `fsd` binary as a child, and a raw TLS client that
//! speaks frames directly (these tests must also send bad ones).
// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use homefs_shared::frame::{encode_prefix, FrameCodec};
use homefs_shared::tls::{pinned_client_config, PinVerifier};
use homefs_shared::{
    Request, RequestHeader, RequestId, Response, ResponseHeader, Token, WireError, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use fsd::config::Config;

/// How long a test waits for any one answer or event before it fails saying what it waited for.
pub const WAIT: Duration = Duration::from_secs(10);

/// The config text edits every test instance gets: light argon2 costs.
const LIGHT: [(&str, &str); 2] =
    [("argon2_memory_kib = 19456", "argon2_memory_kib = 1024"), ("argon2_iterations = 2", "argon2_iterations = 1")];

/// An instance made by `fsd::init` in a temp dir named after the test.
pub struct Instance {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub config_file: PathBuf,
}

impl Instance {
    /// A fresh instance without run_as (the in-process server never switches users).
    pub fn new(test: &str) -> Instance {
        Instance::with_run_as(test, Some(String::new()))
    }

    /// A fresh instance; `run_as` as `fsd init --run-as` (None: init's default).
    pub fn with_run_as(test: &str, run_as: Option<String>) -> Instance {
        let tmp = tempfile::Builder::new().prefix(&format!("fsd-{test}-")).tempdir().expect("temp dir");
        let dir = tmp.path().join("inst");
        let opts = fsd::init::InitOptions { listen: Some("127.0.0.1:0".into()), run_as };
        let inst = fsd::init::init(&dir, &opts).expect("fsd init");
        let inst = Instance { tmp, dir, config_file: inst.config_file };
        inst.edit_config(&LIGHT);
        inst
    }

    /// Replaces whole `key = value` texts in fsd.toml (each must be there).
    pub fn edit_config(&self, edits: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(&self.config_file).expect("read fsd.toml");
        for (from, to) in edits {
            assert!(text.contains(from), "fsd.toml has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(&self.config_file, text).expect("write fsd.toml");
    }

    /// The instance's configuration, loaded as `fsd serve` loads it.
    pub fn config(&self) -> Config {
        Config::load(&self.config_file).expect("load fsd.toml")
    }

    pub fn add_user(&self, name: &str, password: &str) {
        fsd::accounts::admin::add(&self.config(), name, None, password).expect("add user");
    }
}

/// An in-process server (`fsd::serve` on 127.0.0.1:0).
pub struct Server {
    pub addr: SocketAddr,
    pub fingerprint: String,
    /// The server's state, to observe it (e.g. its read budget).
    pub state: Arc<fsd::State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind(&config.listen.addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = tokio::task::spawn_blocking(move || fsd::State::load(config)).await.expect("join").expect("load");
        let fingerprint = state.fingerprint().to_string();
        let state = Arc::new(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fsd::serve(listener, Arc::clone(&state), async move {
            let _ = stopped.await;
        }));
        Server { addr, fingerprint, state, stop: Some(stop), task }
    }

    /// Stops accepting, lets connections finish, and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task).await.expect("serve returns after shutdown").expect("serve task");
    }

    pub async fn connect(&self) -> Conn {
        Conn::connect(self.addr, &self.fingerprint).await
    }
}

/// A raw protocol connection.
pub struct Conn {
    framed: Framed<TlsStream<TcpStream>, FrameCodec>,
    next_id: u64,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, fingerprint: &str) -> Conn {
        let tcp =
            tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect in time").expect("connect");
        let connector = tokio_rustls::TlsConnector::from(pinned_client_config(PinVerifier::pinned(fingerprint)));
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp)).await.expect("TLS in time").expect("TLS");
        Conn { framed: Framed::new(tls, FrameCodec::new(MAX_FRAME_BYTES)), next_id: 1 }
    }

    /// This end's address (the server sees it as the peer).
    pub fn local_addr(&self) -> SocketAddr {
        self.framed.get_ref().get_ref().0.local_addr().expect("local addr")
    }

    /// Sends a request (with no data); returns its id.
    pub async fn send(&mut self, request: Request) -> RequestId {
        self.send_with(request, &[]).await
    }

    pub async fn send_with(&mut self, request: Request, data: &[u8]) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let mut buf = encode_prefix(&RequestHeader { id, request }, data.len(), MAX_FRAME_BYTES).expect("encode");
        buf.put_slice(data);
        self.send_raw(&buf).await;
        id
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let io = self.framed.get_mut();
        io.write_all(bytes).await.expect("write");
        io.flush().await.expect("flush");
    }

    /// The next answer, with its data.
    pub async fn recv(&mut self) -> (ResponseHeader, bytes::Bytes) {
        let frame = tokio::time::timeout(WAIT, self.framed.next())
            .await
            .expect("an answer in time")
            .expect("an answer, not the end of the connection")
            .expect("a valid frame");
        (frame.response().expect("a response header"), frame.data)
    }

    /// The next frame, or `None` once the connection is closed (or broken).
    pub async fn next_frame(&mut self) -> Option<homefs_shared::Frame> {
        self.framed.next().await.and_then(Result::ok)
    }

    /// Sends a request and waits for its answer (no other request may be in flight).
    pub async fn call(&mut self, request: Request) -> Result<Response, WireError> {
        let id = self.send(request).await;
        let (header, _) = self.recv().await;
        assert_eq!(header.id, id, "answer to another request");
        header.result
    }

    pub async fn hello(&mut self) {
        let r = self.call(Request::Hello { version: PROTOCOL_VERSION, client: "session test".into() }).await;
        assert!(matches!(r, Ok(Response::Hello { version: PROTOCOL_VERSION, .. })), "{r:?}");
    }

    /// Hello, then Login; returns the Login answer.
    pub async fn login(&mut self, user: &str, password: &str) -> Response {
        self.hello().await;
        self.call(Request::Login { user: user.into(), password: password.into() }).await.expect("a login answer")
    }

    /// Hello, then Resume; returns the Login answer.
    pub async fn resume(&mut self, token: &Token) -> Response {
        self.hello().await;
        self.call(Request::Resume { token: token.clone() }).await.expect("a login answer")
    }

    /// Waits until the server closes the connection (end of stream or an error).
    pub async fn expect_closed(&mut self, what: &str) {
        match tokio::time::timeout(WAIT, self.framed.next()).await {
            Err(_) => panic!("the server did not close the connection ({what}) within {WAIT:?}"),
            Ok(None) | Ok(Some(Err(_))) => {}
            Ok(Some(Ok(frame))) => {
                let r = frame.response();
                panic!("expected the connection closed ({what}), got an answer {r:?}")
            }
        }
    }
}

/// The token of a 201 answer; panics on anything else.
pub fn granted(r: &Response) -> Token {
    match r {
        Response::Login { code: 201, token: Some(t), .. } => t.clone(),
        other => panic!("expected 201 with a token, got {other:?}"),
    }
}

/// Whether an answer is the 401 every denial looks like.
pub fn is_denied(r: &Response) -> bool {
    *r == Response::Login { code: 401, token: None, message: "login incorrect".into() }
}

/// Polls `check` every 50 ms until it is true; fails naming `what` after `WAIT`.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A frame body with a valid length but a header that is no request.
pub fn garbage_frame() -> Vec<u8> {
    let mut b = BytesMut::new();
    let header = [0xffu8; 12];
    b.put_u32(4 + header.len() as u32);
    b.put_u32(header.len() as u32);
    b.put_slice(&header);
    b.to_vec()
}

/// The built `fsd` binary.
pub fn fsd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fsd")
}

/// Runs `fsd ARGS` to completion with `stdin`; returns (success, stdout, stderr).
pub fn fsd(args: &[&str], config: &Path, stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(fsd_bin())
        .args(args)
        .env("FSD_CONFIG", config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fsd");
    let mut input = child.stdin.take().expect("stdin");
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let out = wait_output(child, &format!("fsd {}", args.join(" ")));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn wait_output(child: Child, what: &str) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}")).expect("fsd output")
}

/// `fsd serve` as a child; killed on drop.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub fingerprint: String,
}

impl ServeProcess {
    /// Starts `fsd serve --config F` and waits for its two lines on stdout.
    pub fn start(config: &Path, log_file: &Path) -> ServeProcess {
        ServeProcess::start_with_env(config, log_file, &[])
    }

    /// [`ServeProcess::start`] with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(config: &Path, log_file: &Path, env: &[(&str, &str)]) -> ServeProcess {
        let mut child = Command::new(fsd_bin())
            .envs(env.iter().copied())
            .args(["serve", "--config"])
            .arg(config)
            .arg("--log-file")
            .arg(log_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn fsd serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next = |what: &str| {
            rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("fsd serve printed no {what} line within {WAIT:?}"))
        };
        let listening = next("'listening on'");
        let addr = listening.strip_prefix("listening on ").unwrap_or_else(|| panic!("first line: {listening:?}"));
        let addr = addr.parse().expect("an address");
        let fp = next("'fingerprint'");
        let fingerprint = fp.strip_prefix("fingerprint ").unwrap_or_else(|| panic!("second line: {fp:?}")).to_string();
        ServeProcess { child, addr, fingerprint }
    }

    pub async fn connect(&self) -> Conn {
        Conn::connect(self.addr, &self.fingerprint).await
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit()
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(ok.success(), "kill -TERM {pid}");
    }

    /// Waits (blocking, at most `WAIT`) for the process to exit after a SIGTERM.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "fsd serve did not exit within {WAIT:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's queues of one IPv4 TCP socket, from `/proc/net/tcp`: for a listening socket
/// (`remote` None) `rx` is the number of connections waiting to be accepted; for a connected one,
/// `tx` is bytes sent but not yet acknowledged and `rx` bytes received that the process has not
/// read yet. `None` when no such socket exists.
pub fn tcp_queues(local: SocketAddr, remote: Option<SocketAddr>) -> Option<TcpQueues> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => panic!("tcp_queues reads /proc/net/tcp, which has IPv4 sockets only"),
    };
    let (want_local, want_remote) = (hex(local), remote.map(hex));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (l, r, state, queues) = (*f.get(1)?, *f.get(2)?, *f.get(3)?, *f.get(4)?);
        let matches = match &want_remote {
            None => state == "0A", // TCP_LISTEN
            Some(want) => r == want,
        };
        if l != want_local || !matches {
            return None;
        }
        let (tx, rx) = queues.split_once(':')?;
        Some(TcpQueues { tx: u64::from_str_radix(tx, 16).ok()?, rx: u64::from_str_radix(rx, 16).ok()? })
    })
}

/// See [`tcp_queues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpQueues {
    pub tx: u64,
    pub rx: u64,
}
