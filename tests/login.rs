//! Login scenarios: passwords, certificate trust (pinned, known_hosts, changed), the session
//! token across reconnects and restarts, and its refusal once the password changes or the user
//! is deleted.

use homefs_mount::client::{Client, ConnectError, Trust};
use homefs_shared::{ErrorCode, FileKind, WirePath};
use homefs_tests::{password, wp, TestServer};
use std::time::{Duration, Instant};

/// Waits until `cond` holds, polling, or fails saying what it waited for.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "gave up after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_right_wrong_and_unknown() {
    let server = TestServer::start("login_right_wrong_and_unknown");
    server.add_user("alice", "correct horse", None);
    let c = server.connect("alice", "correct horse").await;
    assert_eq!(c.user(), "alice");
    assert_eq!(c.fingerprint(), server.fingerprint);
    assert_eq!(c.stat(&WirePath::root()).await.expect("stat the home").kind, FileKind::Dir);

    let wrong = server.try_connect("alice", "battery staple").await;
    assert!(matches!(wrong, Err(ConnectError::Denied)), "wrong password: {:?}", wrong.err());
    let unknown = server.try_connect("mallory", "correct horse").await;
    assert!(matches!(unknown, Err(ConnectError::Denied)), "unknown user: {:?}", unknown.err());
    // The user sees the same words for both.
    assert_eq!(wrong.err().unwrap().to_string(), unknown.err().unwrap().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled() {
    let opts = homefs_tests::ServerOptions::default().set("auth", "throttle_after_failures", "3").set(
        "auth",
        "throttle_base_delay_ms",
        "500",
    );
    let server = TestServer::start_with("failed_logins_are_throttled", opts);
    server.add_user("alice", "pw", None);
    // throttle_after_failures = 3 and a 500 ms base delay: the attempts after the
    // third failure are answered late. Only a lower bound is asserted: robust on a busy machine.
    for _ in 0..3 {
        assert!(matches!(server.try_connect("alice", "nope").await, Err(ConnectError::Denied)));
    }
    let started = Instant::now();
    for _ in 0..2 {
        assert!(matches!(server.try_connect("alice", "nope").await, Err(ConnectError::Denied)));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "two throttled attempts took only {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reused_after_lost_connection_and_restart() {
    let mut server = TestServer::start("token_reused_after_lost_connection_and_restart");
    server.add_user("alice", "pw", None);
    // The password function may be called once only: reconnects must use the token.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let pw: homefs_mount::client::PasswordFn = Box::new(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok("pw".to_string())
    });
    let c = Client::connect(server.options("alice"), pw).await.expect("login");
    c.mkdir(&wp("d"), 0o755).await.expect("mkdir");

    c.break_connection();
    assert_eq!(c.stat(&wp("d")).await.expect("stat after a lost connection").kind, FileKind::Dir);
    assert_eq!(c.reconnects(), 1);

    server.restart();
    assert_eq!(c.stat(&wp("d")).await.expect("stat after a server restart").kind, FileKind::Dir);
    assert!(c.reconnects() >= 2, "reconnects: {}", c.reconnects());
    // Each Resume renews the token; the renewed one works too.
    c.break_connection();
    c.stat(&wp("d")).await.expect("stat with the renewed token");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "the password was asked for again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refused_after_password_change() {
    let server = TestServer::start("token_refused_after_password_change");
    server.add_user("alice", "old", None);
    let c = server.connect("alice", "old").await;
    server.set_password("alice", "new");
    // The running server picks up the users file by itself: wait until the new password works.
    wait_for("the server to reload the users file", Duration::from_secs(20), || async {
        server.try_connect("alice", "new").await.is_ok()
    })
    .await;
    c.break_connection();
    let started = Instant::now();
    let e = c.stat(&WirePath::root()).await.expect_err("the old token must be refused");
    assert_eq!(e.code, ErrorCode::NotConnected, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a refused token should fail fast, took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refused_after_user_deleted_and_restart() {
    let mut server = TestServer::start("token_refused_after_user_deleted_and_restart");
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    c.stat(&WirePath::root()).await.expect("stat");
    server.del_user("alice");
    server.restart();
    let e = c.stat(&WirePath::root()).await.expect_err("the token of a deleted user must be refused");
    assert_eq!(e.code, ErrorCode::NotConnected, "{e}");
    assert!(matches!(server.try_connect("alice", "pw").await, Err(ConnectError::Denied)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_pins_on_first_use_and_refuses_a_change() {
    let server = TestServer::start("known_hosts_pins_on_first_use_and_refuses_a_change");
    server.add_user("alice", "pw", None);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cfg/homefs/known_hosts");
    let with = |accept_new: bool, file: &std::path::Path| {
        let mut o = server.options("alice");
        o.trust = Trust::KnownHosts { file: file.to_path_buf(), accept_new };
        o
    };

    // Unknown, no terminal, no --accept-new: refused before the password is asked for.
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = asked.clone();
    let pw: homefs_mount::client::PasswordFn = Box::new(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok("pw".into())
    });
    match Client::connect(with(false, &file), pw).await {
        Err(ConnectError::UnknownHost { fingerprint }) => assert_eq!(fingerprint, server.fingerprint),
        other => panic!("expected UnknownHost, got {:?}", other.err()),
    }
    assert!(!asked.load(std::sync::atomic::Ordering::SeqCst), "password asked before the server was trusted");
    assert!(!file.exists(), "nothing pinned without consent");

    // --accept-new pins it; later connections need no flag.
    Client::connect(with(true, &file), password("pw")).await.expect("accept-new");
    let line = std::fs::read_to_string(&file).expect("known_hosts written");
    assert_eq!(line.trim(), format!("{} {}", server.addr, server.fingerprint));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o600);
    Client::connect(with(false, &file), password("pw")).await.expect("pinned host");

    // A different pinned fingerprint: refused loudly, naming both.
    let other = dir.path().join("other_known_hosts");
    let fake = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    std::fs::write(&other, format!("{} {fake}\n", server.addr)).expect("write");
    match Client::connect(with(true, &other), password("pw")).await {
        Err(e @ ConnectError::HostKeyChanged { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(fake) && msg.contains(&server.fingerprint), "{msg}");
        }
        other => panic!("expected HostKeyChanged, got {:?}", other.err()),
    }

    // --fingerprint with the wrong value.
    let mut o = server.options("alice");
    o.trust = Trust::Fingerprint(fake.into());
    assert!(matches!(Client::connect(o, password("pw")).await, Err(ConnectError::Tls(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_reported() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let server = TestServer::start("unreachable_server_is_reported");
    let mut o = server.options("alice");
    o.server.port = port;
    assert!(matches!(Client::connect(o, password("pw")).await, Err(ConnectError::Unreachable { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_trusts_by_host_name() {
    let server = TestServer::start("ca_file_trusts_by_host_name");
    server.add_user("alice", "pw", None);
    // fsd init's self-signed certificate names localhost and 127.0.0.1: it is its own CA.
    let mut o = server.options("alice");
    o.server.host = "localhost".into();
    o.trust = Trust::Ca(server.dir.join("cert.pem"));
    let c = Client::connect(o, password("pw")).await.expect("trusted through --ca");
    assert_eq!(c.fingerprint(), server.fingerprint);
    c.stat(&WirePath::root()).await.expect("stat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refused_once_expired() {
    let opts = homefs_tests::ServerOptions::default().set("auth", "token_ttl_secs", "1");
    let server = TestServer::start_with("token_refused_once_expired", opts);
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    // The passing of time is the scenario: the token lives one second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.stat(&WirePath::root()).await.expect("the live session is not cut by the token's expiry");
    c.break_connection();
    let e = c.stat(&WirePath::root()).await.expect_err("an expired token must be refused");
    assert_eq!(e.code, ErrorCode::NotConnected, "{e}");
}
