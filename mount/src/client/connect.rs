//! Making one connection: TCP (bounded by a timeout), TLS with the trust decision (pinned
//! fingerprint, known_hosts with trust on first use, or a CA), `Hello`, and `Login` with the
//! password or `Resume` with the session token. Each phase has its own deadline and an error that
//! names it. The multiplexing of requests over the result is `mux.rs`'s job.

use futures::StreamExt as _;
use homefs_shared::frame::{write_frame, FrameCodec};
use homefs_shared::tls::{self, PinVerifier};
use homefs_shared::{
    login_code, ErrorCode, Request, RequestHeader, RequestId, Response, Token, WireError, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::future::Future;
use std::io::{self, BufRead as _, Write as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt as _, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::FramedRead;

use super::{known_hosts, ConnectError, ConnectOptions, PasswordFn, Trust};

/// How long a TCP connect may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS handshake and `Hello` may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `Login`/`Resume` answer may take: argon2 runs first, and a throttled address is
/// made to wait (up to 30 s with the server's defaults) before it is answered.
pub(crate) const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one write (of a frame, or a flush) may take before the connection counts as dead.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The write buffer: big enough that many small requests go out in one TLS record burst, and a
/// 1 MiB write passes through without being copied into it.
pub(crate) const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// The read buffer under TLS. rustls asks its transport for little at a time (4 KiB when its
/// buffer is empty, at most one record), so without it a 4 KiB read's answer (one 4,135-byte
/// record) took two `recvfrom`s, and a cold 1 MiB `dd` on the mount 67-69 a MiB; with it, one
/// `recvfrom` takes whatever has arrived, up to this much: 1 and 18 (netmount's CPU per MiB read
/// 613-695 -> 530 us; one more copy of the bytes, cheaper than the system calls it saves).
pub(crate) const READ_BUFFER_BYTES: usize = 64 << 10;

/// TCP with a read buffer under TLS (see [`READ_BUFFER_BYTES`]); writes pass straight through.
pub(crate) type Tcp = BufReader<TcpStream>;
pub(crate) type TlsConn = TlsStream<Tcp>;
/// The read half: frames cut by the shared codec.
pub(crate) type Reader = FramedRead<ReadHalf<TlsConn>, FrameCodec>;
/// The write half, buffered.
pub(crate) type Writer = BufWriter<WriteHalf<TlsConn>>;

/// A connection that passed TLS and `Hello`, not yet multiplexed.
pub(crate) struct Transport {
    pub reader: Reader,
    pub writer: Writer,
    next_id: u64,
}

/// Everything needed to dial the server again, for reconnects. The TLS configuration pins the
/// fingerprint accepted at the first connection (or trusts the CA), so a reconnect never asks.
pub(crate) struct Dialer {
    host_port: String,
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    client_name: String,
}

/// The first connection, logged in.
pub(crate) struct Established {
    pub dialer: Dialer,
    pub transport: Transport,
    pub token: Token,
    pub fingerprint: String,
}

/// Runs `fut` with a deadline; a timeout becomes an `io::Error` naming the phase.
pub(crate) async fn with_timeout<T, E>(
    phase: &str,
    dur: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, io::Error>
where
    io::Error: From<E>,
{
    match tokio::time::timeout(dur, fut).await {
        Ok(r) => r.map_err(io::Error::from),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("{phase} timed out after {dur:?}"))),
    }
}

impl Dialer {
    fn new(opts: &ConnectOptions, tls: Arc<ClientConfig>, server_name: ServerName<'static>) -> Dialer {
        Dialer {
            host_port: opts.server.host_port(),
            host: opts.server.host.clone(),
            port: opts.server.port,
            tls,
            server_name,
            client_name: opts.client_name.clone(),
        }
    }

    /// `host:port`, for messages.
    pub(crate) fn host_port(&self) -> &str {
        &self.host_port
    }

    /// TCP and TLS.
    async fn tls(&self) -> Result<TlsConn, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable { addr: self.host_port.clone(), source };
        let tcp = with_timeout("connect", CONNECT_TIMEOUT, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(unreachable)?;
        // Requests are small and latency-bound; the BufWriter already batches them.
        tcp.set_nodelay(true).map_err(unreachable)?;
        let tcp = BufReader::with_capacity(READ_BUFFER_BYTES, tcp);
        let connector = TlsConnector::from(self.tls.clone());
        with_timeout("TLS handshake", HANDSHAKE_TIMEOUT, connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|e| ConnectError::Tls(format!("{}: {e}", self.host_port)))
    }

    /// TCP, TLS and `Hello`.
    pub(crate) async fn open(&self) -> Result<Transport, ConnectError> {
        let conn = self.tls().await?;
        self.hello(conn).await
    }

    async fn hello(&self, conn: TlsConn) -> Result<Transport, ConnectError> {
        let (r, w) = tokio::io::split(conn);
        let mut t = Transport {
            reader: FramedRead::new(r, FrameCodec::new(MAX_FRAME_BYTES)),
            writer: BufWriter::with_capacity(WRITE_BUFFER_BYTES, w),
            next_id: 0,
        };
        let hello = Request::Hello { version: PROTOCOL_VERSION, client: self.client_name.clone() };
        match t.exchange("hello", HANDSHAKE_TIMEOUT, hello).await.map_err(|e| self.lost(e))? {
            Ok(Response::Hello { version, .. }) if version == PROTOCOL_VERSION => Ok(t),
            Ok(Response::Hello { version, .. }) => Err(ConnectError::Version(format!(
                "server speaks protocol {version}, client speaks {PROTOCOL_VERSION}"
            ))),
            Err(e) if e.code == ErrorCode::Protocol => Err(ConnectError::Version(e.message)),
            Err(e) => Err(ConnectError::Other(anyhow::anyhow!("{}: hello refused: {e}", self.host_port))),
            Ok(other) => Err(unexpected(&self.host_port, "hello", &other)),
        }
    }

    /// Logs in again with the token of an earlier login; returns the fresh token.
    ///
    /// # Errors
    /// [`ConnectError::Denied`] when the server refuses the token (expired, user deleted, password
    /// changed); others when the server cannot be reached.
    pub(crate) async fn resume(&self, token: Token) -> Result<(Transport, Token), ConnectError> {
        let mut t = self.open().await?;
        let token = self.login(&mut t, Request::Resume { token }).await?;
        Ok((t, token))
    }

    async fn login(&self, t: &mut Transport, request: Request) -> Result<Token, ConnectError> {
        match t.exchange("login", LOGIN_TIMEOUT, request).await.map_err(|e| self.lost(e))? {
            Ok(Response::Login { code: login_code::LOGGED_IN, token: Some(token), .. }) => Ok(token),
            Ok(Response::Login { code: login_code::DENIED, .. }) => Err(ConnectError::Denied),
            Ok(Response::Login { code, message, .. }) => Err(ConnectError::Other(anyhow::anyhow!(
                "{}: login answered {code} without a token: {message}",
                self.host_port
            ))),
            Err(e) => Err(ConnectError::Other(anyhow::anyhow!("{}: login refused: {e}", self.host_port))),
            Ok(other) => Err(unexpected(&self.host_port, "login", &other)),
        }
    }

    fn lost(&self, e: io::Error) -> ConnectError {
        ConnectError::Unreachable { addr: self.host_port.clone(), source: e }
    }
}

impl Transport {
    /// One request and its answer, before the connection is multiplexed.
    async fn exchange(
        &mut self,
        phase: &str,
        timeout: Duration,
        request: Request,
    ) -> Result<Result<Response, WireError>, io::Error> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let header = RequestHeader { id, request };
        with_timeout(phase, WRITE_TIMEOUT, async {
            write_frame(&mut self.writer, &header, &[], MAX_FRAME_BYTES).await.map_err(frame_io)?;
            self.writer.flush().await
        })
        .await?;
        let frame = with_timeout(phase, timeout, async {
            match self.reader.next().await {
                Some(f) => f.map_err(frame_io),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("server closed the connection at {phase}"),
                )),
            }
        })
        .await?;
        let answer = frame.response().map_err(frame_io)?;
        if answer.id != id {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("answer to an unknown request at {phase}")));
        }
        Ok(answer.result)
    }
}

/// A frame error as an `io::Error` (its text kept).
pub(crate) fn frame_io(e: homefs_shared::FrameError) -> io::Error {
    match e {
        homefs_shared::FrameError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

fn unexpected(host_port: &str, phase: &str, r: &Response) -> ConnectError {
    let kind = format!("{r:?}");
    let kind = kind.split(['(', ' ', '{']).next().unwrap_or("?");
    ConnectError::Other(anyhow::anyhow!("{host_port}: unexpected answer {kind} at {phase}"))
}

/// The fingerprint of the certificate the server presented on this connection.
fn peer_fingerprint(conn: &TlsConn) -> Option<String> {
    conn.get_ref().1.peer_certificates().and_then(|c| c.first()).map(tls::fingerprint)
}

/// A server name for TLS: the host when it is a valid name or IP (needed for `--ca`); with a
/// pinned fingerprint the name is not checked, so any valid one will do.
fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_string()).ok()
}

/// Connects and logs in for the first time, deciding whether to trust the server before the
/// password is asked for (let alone sent).
pub(crate) async fn establish(opts: &ConnectOptions, password: PasswordFn) -> Result<Established, ConnectError> {
    let host_port = opts.server.host_port();
    let any_name = || {
        server_name(&opts.server.host)
            .unwrap_or_else(|| ServerName::try_from("homefs").expect("\"homefs\" is a valid DNS name"))
    };
    let (dialer, conn, fingerprint) = match &opts.trust {
        Trust::Fingerprint(fp) => {
            let verifier = PinVerifier::pinned(fp.clone());
            let dialer = Dialer::new(opts, tls::pinned_client_config(verifier.clone()), any_name());
            let conn = dialer.tls().await.map_err(|e| match verifier.seen() {
                Some(seen) if seen != *fp => ConnectError::Tls(format!(
                    "{host_port}: server certificate {seen} does not match the fingerprint given, {fp}"
                )),
                _ => e,
            })?;
            (dialer, conn, fp.clone())
        }
        Trust::Ca(file) => {
            let config = tls::ca_client_config(file).map_err(|e| ConnectError::Tls(e.to_string()))?;
            let name = server_name(&opts.server.host).ok_or_else(|| {
                ConnectError::Tls(format!("{}: not a valid host name for certificate checks", opts.server.host))
            })?;
            let dialer = Dialer::new(opts, config, name);
            let conn = dialer.tls().await?;
            let fp = peer_fingerprint(&conn).unwrap_or_default();
            (dialer, conn, fp)
        }
        Trust::KnownHosts { file, accept_new } => {
            let known = known_hosts::lookup(file, &host_port).map_err(|e| ConnectError::Other(e.into()))?;
            match known {
                Some(expected) => {
                    let verifier = PinVerifier::pinned(expected.clone());
                    let dialer = Dialer::new(opts, tls::pinned_client_config(verifier.clone()), any_name());
                    let conn = dialer.tls().await.map_err(|e| match verifier.seen() {
                        Some(got) if got != expected => ConnectError::HostKeyChanged {
                            host: host_port.clone(),
                            expected: expected.clone(),
                            got,
                            known_hosts: file.display().to_string(),
                        },
                        _ => e,
                    })?;
                    (dialer, conn, expected)
                }
                None => {
                    let capture = Dialer::new(opts, tls::pinned_client_config(PinVerifier::capture()), any_name());
                    let conn = capture.tls().await?;
                    let fp = peer_fingerprint(&conn)
                        .ok_or_else(|| ConnectError::Tls(format!("{host_port}: server sent no certificate")))?;
                    if !*accept_new {
                        if !opts.interactive {
                            return Err(ConnectError::UnknownHost { fingerprint: fp });
                        }
                        let (hp, f) = (host_port.clone(), fp.clone());
                        let yes = tokio::task::spawn_blocking(move || ask_trust(&hp, &f))
                            .await
                            .map_err(|e| ConnectError::Other(e.into()))?
                            .map_err(|e| ConnectError::Other(anyhow::anyhow!("cannot ask on the terminal: {e}")))?;
                        if !yes {
                            return Err(ConnectError::NotAccepted);
                        }
                    }
                    known_hosts::append(file, &host_port, &fp).map_err(|e| ConnectError::Other(e.into()))?;
                    tracing::info!(host = %host_port, fingerprint = %fp, file = %file.display(), "server pinned in known_hosts");
                    // Reconnects must see the same certificate.
                    let pinned = tls::pinned_client_config(PinVerifier::pinned(fp.clone()));
                    (Dialer::new(opts, pinned, any_name()), conn, fp)
                }
            }
        }
    };
    let mut transport = dialer.hello(conn).await?;
    // The server is trusted: only now is the password asked for.
    let password = tokio::task::spawn_blocking(password).await.map_err(|e| ConnectError::Other(e.into()))??;
    let token = dialer.login(&mut transport, Request::Login { user: opts.user.clone(), password }).await?;
    Ok(Established { dialer, transport, token, fingerprint })
}

/// Asks on the terminal whether to trust an unknown server, as ssh does.
fn ask_trust(host_port: &str, fingerprint: &str) -> io::Result<bool> {
    let mut err = io::stderr().lock();
    write!(
        err,
        "The authenticity of homefs server '{host_port}' can't be established.\n\
         Its certificate fingerprint is {fingerprint}.\n\
         Are you sure you want to continue connecting (yes/no)? "
    )?;
    err.flush()?;
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(false);
        }
        match line.trim() {
            "yes" => return Ok(true),
            "no" => return Ok(false),
            _ => {
                write!(err, "Please type 'yes' or 'no': ")?;
                err.flush()?;
            }
        }
    }
}
