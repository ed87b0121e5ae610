//! Session scenarios against an in-process fsd on 127.0.0.1:0 over real TLS, with a raw client:
//! the version check, login and its throttling, tokens, bad frames, timeouts, users file reloads.

#[path = "session_support/mod.rs"]
mod support;

use homefs_shared::{ErrorCode, Request, WirePath, PROTOCOL_VERSION};
use std::time::{Duration, Instant};
use support::{garbage_frame, granted, is_denied, wait_until, Instance, Server};

#[tokio::test]
async fn version_mismatch_names_both_versions_then_closes() {
    let inst = Instance::new("version");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    let r = c.call(Request::Hello { version: PROTOCOL_VERSION + 1, client: "future".into() }).await;
    let err = r.expect_err("a mismatch is an error");
    assert_eq!(err.code, ErrorCode::Protocol);
    let expected = format!("client speaks protocol {}, server speaks {}", PROTOCOL_VERSION + 1, PROTOCOL_VERSION);
    assert_eq!(err.message, expected);
    c.expect_closed("after a version mismatch").await;
    server.stop().await;
}

#[tokio::test]
async fn first_request_must_be_hello() {
    let inst = Instance::new("nohello");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    let err = c.call(Request::Login { user: "a".into(), password: "b".into() }).await.expect_err("refused");
    assert_eq!(err.code, ErrorCode::Protocol);
    c.expect_closed("after a first request that is not Hello").await;
    server.stop().await;
}

#[tokio::test]
async fn requests_before_login_are_refused_with_access() {
    let inst = Instance::new("prelogin");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    c.hello().await;
    for request in [Request::Stat { path: WirePath::root() }, Request::Ping, Request::StatFs] {
        let err = c.call(request).await.expect_err("refused before login");
        assert_eq!(err.code, ErrorCode::Access);
    }
    server.stop().await;
}

#[tokio::test]
async fn login_right_wrong_and_unknown() {
    let inst = Instance::new("login");
    inst.add_user("alice", "correct horse");
    let server = Server::start(inst.config()).await;

    let mut c = server.connect().await;
    let wrong = c.login("alice", "wrong").await;
    assert!(is_denied(&wrong), "{wrong:?}");
    let mut c2 = server.connect().await;
    let unknown = c2.login("mallory", "correct horse").await;
    // Identical answers: a 401 never tells whether the user exists.
    assert_eq!(wrong, unknown);

    // A 401 leaves the connection open for another attempt.
    let ok = c.call(Request::Login { user: "alice".into(), password: "correct horse".into() }).await.unwrap();
    granted(&ok);
    // A second login on a logged-in connection is a protocol error.
    let again = c.call(Request::Login { user: "alice".into(), password: "correct horse".into() }).await;
    assert_eq!(again.expect_err("second login").code, ErrorCode::Protocol);
    server.stop().await;
}

#[tokio::test]
async fn failed_logins_from_one_address_are_delayed() {
    let inst = Instance::new("throttle");
    inst.edit_config(&[
        ("throttle_after_failures = 3", "throttle_after_failures = 2"),
        ("throttle_base_delay_ms = 500", "throttle_base_delay_ms = 400"),
    ]);
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    c.hello().await;
    // Different (unknown) users: the address alone is throttled.
    for user in ["u1", "u2"] {
        let r = c.call(Request::Login { user: user.into(), password: "x".into() }).await.unwrap();
        assert!(is_denied(&r));
    }
    let started = Instant::now();
    let r = c.call(Request::Login { user: "u3".into(), password: "x".into() }).await.unwrap();
    assert!(is_denied(&r));
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "the third failure was answered after {elapsed:?}, not delayed");
    // The next one waits twice as long.
    let started = Instant::now();
    let r = c.call(Request::Login { user: "u4".into(), password: "x".into() }).await.unwrap();
    assert!(is_denied(&r));
    assert!(started.elapsed() >= Duration::from_millis(800), "not doubled: {:?}", started.elapsed());
    server.stop().await;
}

/// Many connections logging in at once are not delayed while nothing has failed; once a guess
/// has failed, parallel guesses on many connections do not all get the first delay: each counts
/// as it starts and queues behind the others, so the answers come one growing delay apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_on_many_connections_are_throttled_one_after_another() {
    let inst = Instance::new("throttle-parallel");
    inst.edit_config(&[
        ("throttle_after_failures = 3", "throttle_after_failures = 1"),
        ("throttle_base_delay_ms = 500", "throttle_base_delay_ms = 100"),
    ]);
    inst.add_user("nora", "right");
    let server = Server::start(inst.config()).await;
    let connect_all = |n: usize| {
        let server = &server;
        async move {
            let mut conns = Vec::new();
            for _ in 0..n {
                let mut c = server.connect().await;
                c.hello().await;
                conns.push(c);
            }
            conns
        }
    };
    // Twenty right logins at once: none waits (a delay would be at least 100 ms, then doubling).
    let started = Instant::now();
    let logins = connect_all(20).await.into_iter().map(|mut c| async move {
        granted(&c.call(Request::Login { user: "nora".into(), password: "right".into() }).await.unwrap());
    });
    let connected = started.elapsed();
    futures::future::join_all(logins).await;
    let took = started.elapsed() - connected;
    assert!(took < Duration::from_millis(1500), "twenty parallel right logins took {took:?}: throttled");

    let conns = connect_all(5).await;
    let mut first = server.connect().await;
    first.hello().await;
    let r = first.call(Request::Login { user: "nora".into(), password: "wrong".into() }).await.unwrap();
    assert!(is_denied(&r), "{r:?}");
    let started = Instant::now();
    let guesses = conns.into_iter().enumerate().map(|(i, mut c)| async move {
        let r = c.call(Request::Login { user: "nora".into(), password: format!("guess{i}") }).await.unwrap();
        assert!(is_denied(&r), "{r:?}");
        started.elapsed()
    });
    let mut answered: Vec<Duration> = futures::future::join_all(guesses).await;
    answered.sort();
    // With one failure on record, delays of 100, 200, 400, 800 and 1600 ms, one after another:
    // the last is answered after about 3.1 s. Counted only after each check, all five would be
    // answered after the same 100 ms.
    let last = answered[4];
    assert!(last >= Duration::from_millis(2800), "five parallel guesses all answered within {last:?}: {answered:?}");
    server.stop().await;
}

#[tokio::test]
async fn token_works_on_a_new_connection_and_after_a_restart() {
    let inst = Instance::new("token");
    inst.add_user("bob", "pw-bob");
    let server = Server::start(inst.config()).await;
    let token = granted(&server.connect().await.login("bob", "pw-bob").await);
    let fresh = granted(&server.connect().await.resume(&token).await);
    server.stop().await;

    // Same instance directory, new process state: the token key is on disk.
    let server = Server::start(inst.config()).await;
    granted(&server.connect().await.resume(&token).await);
    granted(&server.connect().await.resume(&fresh).await);
    // A forged token is refused like any other denial.
    let mut forged = token.clone();
    forged.0.replace_range(forged.0.len() - 4.., "AAAA");
    assert!(is_denied(&server.connect().await.resume(&forged).await));
    server.stop().await;
}

/// A client that asks for far more than it reads cannot make the server hold more read data than
/// `max_buffered_reads`, over all connections: once the stalled client holds the budget, another
/// client's read waits until the stalled one is cut off at the write timeout, then is served; and
/// the shares come back even though the stalled writer failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_answers_are_bounded_server_wide() {
    use homefs_shared::{OpenFlags, Response, MAX_DATA_BYTES};
    const BUDGET: u64 = 8 << 20;
    let inst = Instance::new("readbudget");
    inst.edit_config(&[
        ("write_timeout_secs = 30", "write_timeout_secs = 1"),
        ("max_buffered_reads = \"24M\"", "max_buffered_reads = \"8M\""),
    ]);
    inst.add_user("pia", "pw");
    let server = Server::start(inst.config()).await;
    assert_eq!(server.state.read_budget_free(), BUDGET);
    let mut a = server.connect().await;
    granted(&a.login("pia", "pw").await);
    let path = WirePath::new(b"big".to_vec()).unwrap();
    let flags = OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() };
    let Ok(Response::Opened { fh, .. }) = a.call(Request::Open { path: path.clone(), flags, mode: 0o600 }).await else {
        panic!("open failed")
    };
    let id = a.send_with(Request::Write { fh, offset: 0 }, &vec![7u8; MAX_DATA_BYTES as usize]).await;
    assert_eq!(a.recv().await.0.id, id);
    // 40 reads of 4 MiB (160 MiB) that this client does not read.
    for _ in 0..40 {
        a.send(Request::Read { fh, offset: 0, len: MAX_DATA_BYTES }).await;
    }
    let state = &server.state;
    wait_until("the stalled client's reads to use up the read budget", || async move { state.read_budget_free() == 0 })
        .await;
    let started = Instant::now();
    let mut b = server.connect().await;
    granted(&b.login("pia", "pw").await);
    let read_only = OpenFlags { read: true, ..OpenFlags::default() };
    let Ok(Response::Opened { fh, .. }) = b.call(Request::Open { path, flags: read_only, mode: 0 }).await else {
        panic!("open failed")
    };
    let id = b.send(Request::Read { fh, offset: 0, len: MAX_DATA_BYTES }).await;
    let (answer, data) = b.recv().await;
    let waited = started.elapsed();
    assert_eq!(answer.id, id);
    assert!(matches!(answer.result, Ok(Response::Data { .. })), "{:?}", answer.result);
    assert_eq!(data.len(), MAX_DATA_BYTES as usize);
    assert!(waited >= Duration::from_millis(500), "another read was served at once ({waited:?}) past the budget");
    drop(a);
    wait_until("every read share to come back", || async move { state.read_budget_free() == BUDGET }).await;
    server.stop().await;
}

/// Deleting a user ends the sessions they are logged in with, not only their tokens.
#[tokio::test]
async fn a_deleted_users_session_ends_at_its_next_request() {
    let inst = Instance::new("deleted-session");
    inst.add_user("otto", "pw");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    granted(&c.login("otto", "pw").await);
    c.call(Request::Ping).await.expect("served before the deletion");
    fsd::accounts::admin::del(&inst.config(), "otto", false).expect("fsd user del");
    // The server sees the change within its poll interval; until then pings are still served.
    let deadline = Instant::now() + support::WAIT;
    loop {
        assert!(Instant::now() < deadline, "the session of a deleted user was still served after {:?}", support::WAIT);
        let id = c.send(Request::Ping).await;
        let (header, _) = c.recv().await;
        assert_eq!(header.id, id);
        match header.result {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Access, "{e:?}");
                break;
            }
        }
    }
    c.expect_closed("after a request of a deleted user").await;
    server.stop().await;
}

#[tokio::test]
async fn token_is_refused_after_expiry() {
    let inst = Instance::new("expiry");
    inst.edit_config(&[
        ("token_ttl_secs = 604800", "token_ttl_secs = 1"),
        ("throttle_after_failures = 3", "throttle_after_failures = 1000"),
    ]);
    inst.add_user("carol", "pw");
    let server = Server::start(inst.config()).await;
    let token = granted(&server.connect().await.login("carol", "pw").await);
    // Expiry has a one-second resolution: the token is refused at most two seconds later.
    wait_until("the token to expire", || {
        let (server, token) = (&server, &token);
        async move { is_denied(&server.connect().await.resume(token).await) }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn token_is_refused_after_user_deletion_and_password_change() {
    let inst = Instance::new("revoke");
    inst.edit_config(&[("throttle_after_failures = 3", "throttle_after_failures = 1000")]);
    inst.add_user("dave", "old");
    inst.add_user("erin", "pw");
    let server = Server::start(inst.config()).await;
    let dave = granted(&server.connect().await.login("dave", "old").await);
    let erin = granted(&server.connect().await.login("erin", "pw").await);

    fsd::accounts::admin::passwd(&inst.config(), "dave", "new").unwrap();
    wait_until("dave's old token to be refused after the password change", || {
        let (server, dave) = (&server, &dave);
        async move { is_denied(&server.connect().await.resume(dave).await) }
    })
    .await;
    granted(&server.connect().await.login("dave", "new").await);
    assert!(is_denied(&server.connect().await.login("dave", "old").await));

    fsd::accounts::admin::del(&inst.config(), "erin", false).unwrap();
    wait_until("erin's token to be refused after her deletion", || {
        let (server, erin) = (&server, &erin);
        async move { is_denied(&server.connect().await.resume(erin).await) }
    })
    .await;
    assert!(is_denied(&server.connect().await.login("erin", "pw").await));
    server.stop().await;
}

#[tokio::test]
async fn users_file_reload_picks_up_a_new_user() {
    let inst = Instance::new("reload");
    inst.edit_config(&[("throttle_after_failures = 3", "throttle_after_failures = 1000")]);
    let server = Server::start(inst.config()).await;
    assert!(is_denied(&server.connect().await.login("frank", "pw").await));
    inst.add_user("frank", "pw");
    wait_until("the server to accept a user added while it runs", || {
        let server = &server;
        async move { !is_denied(&server.connect().await.login("frank", "pw").await) }
    })
    .await;
    granted(&server.connect().await.login("frank", "pw").await);

    server.stop().await;
}

#[tokio::test]
async fn a_users_file_that_does_not_parse_keeps_the_old_users() {
    let inst = Instance::new("badreload");
    inst.add_user("hank", "pw");
    let accounts = fsd::accounts::Accounts::load(&inst.config()).unwrap();
    let peer = "127.0.0.1".parse().unwrap();
    let login = |a: fsd::accounts::Login| matches!(a, fsd::accounts::Login::Granted { .. });
    assert!(login(accounts.login_password("hank", "pw".into(), peer).await));
    std::fs::write(inst.dir.join("users.toml"), "[users.hank\npassword = ").unwrap();
    assert!(accounts.reload_if_changed().await.is_err(), "a broken file is reported");
    assert!(login(accounts.login_password("hank", "pw".into(), peer).await), "the old users are kept");
    // Reported once per version of the file, not on every poll.
    assert!(matches!(accounts.reload_if_changed().await, Ok(None)));
    // A repaired file is picked up, with what changed.
    std::fs::remove_file(inst.dir.join("users.toml")).unwrap();
    std::fs::write(inst.dir.join("users.toml"), "").unwrap();
    inst.add_user("ivy", "pw2");
    let changes = accounts.reload_if_changed().await.unwrap().expect("changed");
    assert_eq!(changes.removed, vec!["hank".to_string()]);
    assert_eq!(changes.quotas.len(), 1);
    assert!(!login(accounts.login_password("hank", "pw".into(), peer).await));
    assert!(login(accounts.login_password("ivy", "pw2".into(), peer).await));
}

#[tokio::test]
async fn malformed_and_oversized_frames_close_only_their_connection() {
    let inst = Instance::new("frames");
    let server = Server::start(inst.config()).await;
    let mut healthy = server.connect().await;
    healthy.hello().await;

    let mut bad = server.connect().await;
    bad.hello().await;
    bad.send_raw(&garbage_frame()).await;
    bad.expect_closed("after an undecodable header").await;

    let mut huge = server.connect().await;
    huge.send_raw(&u32::MAX.to_be_bytes()).await;
    huge.expect_closed("after an over-limit length").await;

    let mut short = server.connect().await;
    short.send_raw(&[0, 0, 0, 2, 0, 0]).await;
    short.expect_closed("after a frame shorter than its header length").await;

    // The other connection is still served, and new ones are accepted.
    let err = healthy.call(Request::Stat { path: WirePath::root() }).await.expect_err("not logged in");
    assert_eq!(err.code, ErrorCode::Access);
    server.connect().await.hello().await;
    server.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_at_the_login_timeout() {
    let inst = Instance::new("idle");
    inst.edit_config(&[("login_timeout_secs = 30", "login_timeout_secs = 1")]);
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    let started = Instant::now();
    c.hello().await;
    c.expect_closed("a client that never logs in").await;
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn an_idle_session_is_closed_at_the_idle_timeout() {
    let inst = Instance::new("idle2");
    inst.edit_config(&[("idle_timeout_secs = 300", "idle_timeout_secs = 1")]);
    inst.add_user("gina", "pw");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    granted(&c.login("gina", "pw").await);
    let started = Instant::now();
    c.expect_closed("an idle logged-in session").await;
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn a_new_connection_waits_past_the_connection_limit() {
    let inst = Instance::new("connlimit");
    inst.edit_config(&[("max_connections = 1024", "max_connections = 1")]);
    let server = Server::start(inst.config()).await;
    let mut first = server.connect().await;
    first.hello().await;
    // The second TCP connection waits in the backlog: its TLS handshake cannot complete.
    let addr = server.addr;
    let fp = server.fingerprint.clone();
    let second = tokio::spawn(async move {
        let mut c = support::Conn::connect(addr, &fp).await;
        c.hello().await;
    });
    // Observable in the kernel: the second connection sits in the listener's accept queue. A
    // server that accepted it at once would empty the queue, and this wait would fail.
    wait_until("the second connection waiting in the accept queue", || async move {
        support::tcp_queues(addr, None).is_some_and(|q| q.rx == 1)
    })
    .await;
    assert!(!second.is_finished(), "a second connection was served past max_connections = 1");
    drop(first);
    tokio::time::timeout(support::WAIT, second).await.expect("served once the first is gone").unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_login_past_the_per_user_limit_is_refused() {
    let inst = Instance::new("userlimit");
    inst.edit_config(&[("max_connections_per_user = 64", "max_connections_per_user = 1")]);
    inst.add_user("jack", "pw");
    let server = Server::start(inst.config()).await;
    let mut first = server.connect().await;
    granted(&first.login("jack", "pw").await);
    let mut second = server.connect().await;
    second.hello().await;
    let err = second.call(Request::Login { user: "jack".into(), password: "pw".into() }).await.expect_err("refused");
    assert_eq!(err.code, ErrorCode::Busy);
    second.expect_closed("after a login past the per-user limit").await;
    // The permit is the connection's: once it is gone, the user may connect again.
    drop(first);
    wait_until("a new login once the first connection closed", || {
        let server = &server;
        async move {
            let mut c = server.connect().await;
            c.hello().await;
            let r = c.call(Request::Login { user: "jack".into(), password: "pw".into() }).await;
            matches!(r, Ok(homefs_shared::Response::Login { code: 201, .. }))
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_others_are_served() {
    use homefs_shared::{OpenFlags, Response};
    let inst = Instance::new("stalled");
    inst.edit_config(&[
        ("write_timeout_secs = 30", "write_timeout_secs = 1"),
        ("max_in_flight_per_session = 64", "max_in_flight_per_session = 4"),
    ]);
    inst.add_user("kim", "pw");
    let server = Server::start(inst.config()).await;
    let mut c = server.connect().await;
    granted(&c.login("kim", "pw").await);
    let path = WirePath::new(b"big".to_vec()).unwrap();
    let flags = OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() };
    let Ok(Response::Opened { fh, .. }) = c.call(Request::Open { path, flags, mode: 0o600 }).await else {
        panic!("open failed")
    };
    let chunk = vec![7u8; homefs_shared::MAX_DATA_BYTES as usize];
    let id = c.send_with(Request::Write { fh, offset: 0 }, &chunk).await;
    assert_eq!(c.recv().await.0.id, id);

    // 200 reads of 4 MiB (800 MiB) that this client never reads: the server must not buffer them.
    const SENT: usize = 200;
    for _ in 0..SENT {
        c.send(Request::Read { fh, offset: 0, len: homefs_shared::MAX_DATA_BYTES }).await;
    }
    // Meanwhile another client of the same user is served.
    let mut other = server.connect().await;
    granted(&other.login("kim", "pw").await);
    other.call(Request::Ping).await.expect("ping while another session is stalled");

    // The stalled writer times out and the connection closes; what arrived before is far less
    // than what was asked.
    let mut answers = 0;
    loop {
        match tokio::time::timeout(support::WAIT, c.next_frame()).await {
            Err(_) => panic!("the stalled connection was not closed"),
            Ok(Some(_)) => answers += 1,
            Ok(None) => break,
        }
        if answers == 1 {
            // Stop reading again after the first answer, past the write timeout.
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        }
    }
    assert!(answers < SENT, "all {answers} answers were buffered for a client that did not read");
    other.call(Request::Ping).await.expect("the other session is still served");
    server.stop().await;
}

/// Write data held by the server is bounded by `max_buffered_writes` over all connections: with
/// room for one frame only, two clients that each pipeline 8 writes of 4 MiB both have every write
/// applied (each waits for room rather than failing), the data arrives intact, and every share
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_data_is_bounded_server_wide_and_every_write_lands() {
    use homefs_shared::{OpenFlags, Response, MAX_DATA_BYTES, MAX_FRAME_BYTES};
    const WRITES: u64 = 8;
    let inst = Instance::new("writebudget");
    inst.edit_config(&[("max_buffered_writes = \"24M\"", "max_buffered_writes = \"4352K\"")]);
    inst.add_user("wes", "pw");
    let server = Server::start(inst.config()).await;
    let full = u64::from(MAX_FRAME_BYTES);
    assert_eq!(server.state.write_budget_free(), full);
    let chunk = MAX_DATA_BYTES as usize;
    let pipeline = |name: &'static str, byte: u8| {
        let server = &server;
        async move {
            let mut c = server.connect().await;
            granted(&c.login("wes", "pw").await);
            let path = WirePath::new(name.as_bytes().to_vec()).unwrap();
            let flags = OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() };
            let Ok(Response::Opened { fh, .. }) = c.call(Request::Open { path, flags, mode: 0o600 }).await else {
                panic!("open failed")
            };
            let mut ids = Vec::new();
            for i in 0..WRITES {
                let data = vec![byte.wrapping_add(i as u8); chunk];
                ids.push(c.send_with(Request::Write { fh, offset: i * chunk as u64 }, &data).await);
            }
            for _ in 0..WRITES {
                let (answer, _) = c.recv().await;
                assert!(ids.contains(&answer.id), "answer to an unknown id");
                assert!(matches!(answer.result, Ok(Response::Written { .. })), "{name}: {:?}", answer.result);
            }
            for i in 0..WRITES {
                let id = c.send(Request::Read { fh, offset: i * chunk as u64, len: MAX_DATA_BYTES }).await;
                let (answer, data) = c.recv().await;
                assert_eq!(answer.id, id);
                assert!(
                    data.len() == chunk && data.iter().all(|&b| b == byte.wrapping_add(i as u8)),
                    "{name}: chunk {i}"
                );
            }
        }
    };
    let state = &server.state;
    let done = std::sync::atomic::AtomicBool::new(false);
    // The least room seen while the writes run (a 1 ms poll: each write holds its share for as
    // long as its frame waits and is written to disk).
    let least = async {
        let mut least = full;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            least = least.min(state.write_budget_free());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        least
    };
    let writes = async {
        tokio::join!(pipeline("one", 1), pipeline("two", 101));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let ((), least) = tokio::join!(writes, least);
    assert!(least < full, "no write ever held a share of the write budget");
    wait_until("every write share to come back", || async move { state.write_budget_free() == full }).await;
    server.stop().await;
}

/// A measurement, not a check (ignored by default): round trips per second of the `fsd` binary
/// on one connection with one request in flight — `Stat` of a file, and 4 KiB `Read`s at random
/// offsets of a file in the page cache. With `FSD_BENCH_ENV_B="NAME=VALUE"`, each round runs a
/// second server with that variable set, alternating, and prints the ratio (B / A) per round.
/// Run: `cargo test --release -p fsd --test session_protocol -- --ignored --nocapture round_trip_rate`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn round_trip_rate() {
    use homefs_shared::{OpenFlags, Response};
    let n: usize = std::env::var("FSD_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let rounds: usize = std::env::var("FSD_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let env_b = std::env::var("FSD_BENCH_ENV_B").ok();
    let inst = Instance::new("rtt");
    inst.add_user("alice", "pw");
    const FILE_BYTES: u64 = 16 << 20;
    let measure = |env: Vec<(String, String)>| {
        let config_file = inst.config_file.clone();
        let log = inst.dir.join("bench.log");
        async move {
            let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let server = support::ServeProcess::start_with_env(&config_file, &log, &env_refs);
            let mut c = server.connect().await;
            granted(&c.login("alice", "pw").await);
            let path = WirePath::new("rtt-file").expect("valid");
            let flags = OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() };
            let Ok(Response::Opened { fh, attr }) =
                c.call(Request::Open { path: path.clone(), flags, mode: 0o600 }).await
            else {
                panic!("open")
            };
            if attr.size < FILE_BYTES {
                let chunk = vec![5u8; 1 << 20];
                for i in 0..FILE_BYTES >> 20 {
                    let id = c.send_with(Request::Write { fh, offset: i << 20 }, &chunk).await;
                    let (h, _) = c.recv().await;
                    assert_eq!(h.id, id);
                    h.result.expect("write");
                }
            }
            let pid = server.child.id();
            let (cpu0, cs0) = process_cost(pid);
            let started = Instant::now();
            for _ in 0..n {
                c.call(Request::Stat { path: path.clone() }).await.expect("stat");
            }
            let stats = n as f64 / started.elapsed().as_secs_f64();
            let (cpu1, cs1) = process_cost(pid);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let started = Instant::now();
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (FILE_BYTES / 4096)) * 4096;
                c.call(Request::Read { fh, offset, len: 4096 }).await.expect("read");
            }
            let reads = n as f64 / started.elapsed().as_secs_f64();
            let (cpu2, cs2) = process_cost(pid);
            drop(c);
            drop(server);
            let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
            // (rate, fsd CPU µs per request, fsd context switches per request) for stat and read.
            [(stats, per(cpu0, cpu1), per(cs0, cs1)), (reads, per(cpu1, cpu2), per(cs1, cs2))]
        }
    };
    for round in 0..rounds {
        let a = measure(Vec::new()).await;
        let show = |tag: &str, m: &[(f64, f64, f64); 2]| {
            format!(
                "{tag} stat {:.0}/s {:.1}us {:.2}cs  read4k {:.0}/s {:.1}us {:.2}cs",
                m[0].0, m[0].1, m[0].2, m[1].0, m[1].1, m[1].2
            )
        };
        print!("round {round}: {}", show("A", &a));
        if let Some(b) = &env_b {
            let (k, v) = b.split_once('=').expect("FSD_BENCH_ENV_B is NAME=VALUE");
            let b = measure(vec![(k.to_string(), v.to_string())]).await;
            print!(" | {} | B/A rate stat {:.2} read {:.2}", show("B", &b), b[0].0 / a[0].0, b[1].0 / a[1].0);
        }
        println!();
    }
}

/// CPU time (µs, user + system) and context switches (voluntary + not) of all threads of `pid`
/// so far, from /proc.
fn process_cost(pid: u32) -> (u64, u64) {
    let (mut cpu_ticks, mut switches) = (0u64, 0u64);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    for task in tasks.flatten() {
        let dir = task.path();
        if let Ok(stat) = std::fs::read_to_string(dir.join("stat")) {
            // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            cpu_ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            cpu_ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                if let Some(v) =
                    line.strip_prefix("voluntary_ctxt_switches:").or(line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    // USER_HZ is 100 on Linux: a tick is 10 ms.
    (cpu_ticks * 10_000, switches)
}
