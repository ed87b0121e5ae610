//! Change notices against an in-process fsd over real TLS, with raw clients: what a subscribed
//! connection is told about its user's other connections' changes, and what it is not told
//! (its own changes, another user's, anything before it subscribed or when it never did).

#[path = "session_support/mod.rs"]
mod support;

use homefs_shared::frame::encode_prefix;
use homefs_shared::{
    ErrorCode, Fh, OpenFlags, RenameFlags, Request, RequestHeader, RequestId, Response, SetAttr, WirePath,
    MAX_FRAME_BYTES, NOTICE_ID,
};
use std::collections::BTreeSet;
use std::time::Instant;
use support::{granted, Conn, Instance, Server, WAIT};

fn wp(s: &str) -> WirePath {
    WirePath::new(s.as_bytes().to_vec()).expect("a valid path")
}

/// A logged-in connection of `user`.
async fn logged_in(server: &Server, user: &str) -> Conn {
    let mut c = server.connect().await;
    granted(&c.login(user, "pw").await);
    c
}

async fn subscribe(c: &mut Conn) {
    assert_eq!(c.call(Request::Subscribe).await, Ok(Response::Done), "Subscribe is answered Done");
}

/// Reads notices until every path of `want` was named (or `all` came); returns every path named
/// on the way. Fails saying what is missing after [`WAIT`], or on anything but a notice.
async fn notices_until(c: &mut Conn, want: &[&str]) -> BTreeSet<String> {
    let deadline = Instant::now() + WAIT;
    let mut seen = BTreeSet::new();
    loop {
        let missing: Vec<&str> = want.iter().copied().filter(|w| !seen.contains(*w)).collect();
        if missing.is_empty() {
            return seen;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, c.next_frame())
            .await
            .unwrap_or_else(|_| panic!("waited {WAIT:?} for notices of {missing:?}; got {seen:?}"))
            .expect("the connection stays open");
        let header = frame.response().expect("a response header");
        assert_eq!(header.id, NOTICE_ID, "only notices arrive unasked: {header:?}");
        match header.result {
            Ok(Response::Changed { paths, all: false }) => {
                seen.extend(paths.iter().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()))
            }
            other => panic!("expected a Changed notice with paths, got {other:?}"),
        }
    }
}

fn created(flags_truncate: bool) -> OpenFlags {
    OpenFlags { read: false, write: true, append: false, create: true, exclusive: false, truncate: flags_truncate }
}

async fn open(c: &mut Conn, path: &str, flags: OpenFlags) -> Fh {
    match c.call(Request::Open { path: wp(path), flags, mode: 0o644 }).await {
        Ok(Response::Opened { fh, .. }) => fh,
        other => panic!("open {path}: {other:?}"),
    }
}

async fn ok(c: &mut Conn, request: Request) -> Response {
    let what = format!("{request:?}");
    c.call(request).await.unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Sends a write (with data) and waits for its answer.
async fn write(c: &mut Conn, fh: Fh, offset: u64, data: &[u8]) {
    let id = c.send_with(Request::Write { fh, offset }, data).await;
    let (header, _) = c.recv().await;
    assert_eq!(header.id, id);
    assert!(matches!(header.result, Ok(Response::Written { .. })), "write: {:?}", header.result);
}

fn instance(test: &str, users: &[&str]) -> Instance {
    let inst = Instance::new(test);
    for u in users {
        inst.add_user(u, "pw");
    }
    inst
}

#[tokio::test]
async fn a_subscriber_hears_of_each_kind_of_change_by_another_connection() {
    let inst = instance("notice-kinds", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    subscribe(&mut a).await;

    ok(&mut b, Request::Mkdir { path: wp("d"), mode: 0o755 }).await;
    notices_until(&mut a, &["d"]).await;

    let fh = open(&mut b, "d/f", created(false)).await;
    notices_until(&mut a, &["d/f"]).await;
    write(&mut b, fh, 0, b"hello").await;
    notices_until(&mut a, &["d/f"]).await;
    ok(&mut b, Request::Close { fh }).await;
    notices_until(&mut a, &["d/f"]).await;

    ok(&mut b, Request::Rename { from: wp("d/f"), to: wp("g"), flags: RenameFlags::default() }).await;
    notices_until(&mut a, &["d/f", "g"]).await;
    ok(&mut b, Request::Symlink { target: b"g".to_vec(), path: wp("s") }).await;
    ok(&mut b, Request::Link { from: wp("g"), to: wp("h") }).await;
    notices_until(&mut a, &["s", "h"]).await;
    let set = SetAttr { mode: Some(0o600), ..SetAttr::default() };
    ok(&mut b, Request::SetAttr { path: wp("g"), fh: None, set }).await;
    notices_until(&mut a, &["g"]).await;
    ok(&mut b, Request::Unlink { path: wp("h") }).await;
    ok(&mut b, Request::Rmdir { path: wp("d") }).await;
    notices_until(&mut a, &["h", "d"]).await;

    // Opening without create or truncate changes nothing; a failed request changes nothing: the
    // next notice names only the fence.
    let ro = OpenFlags { read: true, ..OpenFlags::default() };
    let fh = open(&mut b, "g", ro).await;
    ok(&mut b, Request::Close { fh }).await;
    let err = b.call(Request::Unlink { path: wp("absent") }).await.expect_err("no such file");
    assert_eq!(err.code, ErrorCode::NotFound);
    ok(&mut b, Request::Mkdir { path: wp("fence"), mode: 0o755 }).await;
    let seen = notices_until(&mut a, &["fence"]).await;
    assert_eq!(seen, BTreeSet::from(["fence".to_string()]), "only the change is announced");
    server.stop().await;
}

#[tokio::test]
async fn own_changes_and_other_users_changes_are_not_announced() {
    let inst = instance("notice-scope", &["alice", "bob"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    let mut bob = logged_in(&server, "bob").await;
    let mut bob2 = logged_in(&server, "bob").await;
    subscribe(&mut a).await;
    subscribe(&mut b).await;
    subscribe(&mut bob).await;

    // A's own change: its answer is the next frame, and no notice of it ever follows.
    ok(&mut a, Request::Mkdir { path: wp("mine"), mode: 0o755 }).await;
    // B is subscribed too: it hears of A's change, and A does not hear of it (A's own).
    notices_until(&mut b, &["mine"]).await;
    // Alice's changes are not bob's business: bob's next notice is his own user's fence.
    ok(&mut b, Request::Mkdir { path: wp("secret"), mode: 0o755 }).await;
    ok(&mut bob2, Request::Mkdir { path: wp("bobs-fence"), mode: 0o755 }).await;
    let bob_saw = notices_until(&mut bob, &["bobs-fence"]).await;
    assert_eq!(bob_saw, BTreeSet::from(["bobs-fence".to_string()]), "nothing of alice's reaches bob");
    // A hears of B's change and of nothing of its own (nor of bob's).
    let a_saw = notices_until(&mut a, &["secret"]).await;
    assert_eq!(a_saw, BTreeSet::from(["secret".to_string()]), "A's own mkdir is not echoed to A");
    // A second Subscribe is answered and changes nothing (no duplicate notices).
    subscribe(&mut a).await;
    ok(&mut b, Request::Mkdir { path: wp("once"), mode: 0o755 }).await;
    assert_eq!(notices_until(&mut a, &["once"]).await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn unsubscribed_connections_receive_no_unasked_frames() {
    let inst = instance("notice-unsubscribed", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    let mut c = logged_in(&server, "alice").await;
    subscribe(&mut a).await;
    ok(&mut c, Request::Mkdir { path: wp("by-c"), mode: 0o755 }).await;
    ok(&mut b, Request::Mkdir { path: wp("by-b"), mode: 0o755 }).await;
    // Once A, subscribed, has heard of both changes, they were published; B and C, not
    // subscribed, must not have got a frame for them: their next frame is the answer to a Ping
    // (`call` fails on a frame with another id).
    notices_until(&mut a, &["by-c", "by-b"]).await;
    assert_eq!(b.call(Request::Ping).await, Ok(Response::Done));
    assert_eq!(c.call(Request::Ping).await, Ok(Response::Done));
    server.stop().await;
}

#[tokio::test]
async fn a_request_with_the_notice_id_is_refused() {
    let inst = instance("notice-id0", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let buf =
        encode_prefix(&RequestHeader { id: RequestId(0), request: Request::Ping }, 0, MAX_FRAME_BYTES).expect("encode");
    a.send_raw(&buf).await;
    let (header, _) = a.recv().await;
    assert_eq!(header.id, NOTICE_ID);
    assert_eq!(header.result.expect_err("refused").code, ErrorCode::Protocol);
    // The session goes on.
    assert_eq!(a.call(Request::Ping).await, Ok(Response::Done));
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_writes_is_announced_once_per_burst_not_per_write() {
    let inst = instance("notice-burst", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    subscribe(&mut a).await;
    let fh = open(&mut b, "big", created(true)).await;
    notices_until(&mut a, &["big"]).await;
    // 64 writes back to back: the first announces the file, the rest fall within the burst
    // interval (100 ms) unless the machine is very slow, and Close announces the final state.
    let started = Instant::now();
    let chunk = vec![7u8; 64 << 10];
    for i in 0..64u64 {
        write(&mut b, fh, i * chunk.len() as u64, &chunk).await;
    }
    let took = started.elapsed();
    ok(&mut b, Request::Close { fh }).await;
    ok(&mut b, Request::Mkdir { path: wp("fence"), mode: 0o755 }).await;
    let mut frames_naming_big = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, a.next_frame()).await.expect("the fence in time").expect("open");
        let header = frame.response().expect("header");
        let Ok(Response::Changed { paths, all: false }) = header.result else { panic!("{header:?}") };
        frames_naming_big += paths.iter().filter(|p| p.as_bytes() == b"big").count();
        if paths.iter().any(|p| p.as_bytes() == b"fence") {
            break;
        }
    }
    // One per started 100 ms of writing, plus the Close.
    let bound = 2 + took.as_millis() as usize / 100;
    assert!(frames_naming_big >= 1, "the writes were announced");
    assert!(frames_naming_big <= bound, "{frames_naming_big} notices for 64 writes in {took:?} (bound {bound})");
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_all_then_notices_again() {
    let inst = instance("notice-overflow", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    subscribe(&mut a).await;
    // Long paths fill A's unread TCP window and the server's buffers quickly; then its inbox.
    let mut dir = String::new();
    for level in 0..15 {
        if level > 0 {
            dir.push('/');
        }
        dir.push_str(&format!("{level:02}{}", "d".repeat(248)));
        ok(&mut b, Request::Mkdir { path: wp(&dir), mode: 0o755 }).await;
    }
    // Pipelined in batches: 3000 paths of 4 KiB (12 MiB) exceed what the socket buffers
    // (at most 4 MiB send, 128 KiB receive while unread), the writer (256 KiB) and the inbox
    // (1024 paths) hold together.
    const MKDIRS: usize = 3000;
    const BATCH: usize = 32;
    for batch in 0..MKDIRS / BATCH {
        let mut ids = BTreeSet::new();
        for i in 0..BATCH {
            let path = format!("{dir}/{:06}{}", batch * BATCH + i, "n".repeat(240));
            ids.insert(b.send(Request::Mkdir { path: wp(&path), mode: 0o755 }).await.0);
        }
        // Answers come in any order.
        while !ids.is_empty() {
            let (header, _) = b.recv().await;
            assert!(ids.remove(&header.id.0), "an answer to a request of this batch: {header:?}");
            assert!(header.result.is_ok(), "mkdir: {:?}", header.result);
        }
    }
    // Now A reads: paths first (what was sent before it fell behind), then `all`.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, a.next_frame()).await.expect("`all` in time").expect("open");
        let header = frame.response().expect("header");
        assert_eq!(header.id, NOTICE_ID);
        match header.result {
            Ok(Response::Changed { all: true, paths }) => {
                assert!(paths.is_empty(), "`all` comes without paths");
                break;
            }
            Ok(Response::Changed { all: false, .. }) => {}
            other => panic!("expected notices, got {other:?}"),
        }
    }
    // After `all`, notices are paths again.
    ok(&mut b, Request::Mkdir { path: wp("after"), mode: 0o755 }).await;
    notices_until(&mut a, &["after"]).await;
    server.stop().await;
}

/// Sends `request` and reads frames until its answer; returns the answer and every path the
/// notices before it named.
async fn call_collecting(c: &mut Conn, request: Request) -> (Result<Response, homefs_shared::WireError>, Vec<String>) {
    let id = c.send(request).await;
    let mut named = Vec::new();
    loop {
        let (header, _) = c.recv().await;
        if header.id == id {
            return (header.result, named);
        }
        assert_eq!(header.id, NOTICE_ID, "only notices arrive unasked: {header:?}");
        match header.result {
            Ok(Response::Changed { paths, .. }) => {
                named.extend(paths.iter().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()))
            }
            other => panic!("expected a Changed notice, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_lock_grant_comes_after_the_notices_of_changes_answered_before_it() {
    use homefs_shared::{LockKind, LockSpec};
    let inst = instance("notice-lock-barrier", &["alice"]);
    let server = Server::start(inst.config()).await;
    let mut a = logged_in(&server, "alice").await;
    let mut b = logged_in(&server, "alice").await;
    subscribe(&mut a).await;
    let fh = open(&mut a, "lockfile", created(false)).await;
    let spec = |kind| LockSpec { kind, start: 0, end: u64::MAX, owner: 7, pid: 1, flock: false };
    // Each change is answered to B before A asks for the lock: A must hear of it before the
    // grant (without the barrier the notice waits out its coalescing and comes after).
    for round in 0..20 {
        let dir = format!("r{round}");
        ok(&mut b, Request::Mkdir { path: wp(&dir), mode: 0o755 }).await;
        let (granted, named) =
            call_collecting(&mut a, Request::Lock { fh, lock: spec(LockKind::Write), wait: true }).await;
        assert_eq!(granted, Ok(Response::Done), "round {round}: the lock is granted");
        assert!(named.contains(&dir), "round {round}: the notice of {dir} came before the grant; before it: {named:?}");
        let (unlocked, _) =
            call_collecting(&mut a, Request::Lock { fh, lock: spec(LockKind::Unlock), wait: false }).await;
        assert_eq!(unlocked, Ok(Response::Done), "round {round}: unlocked");
    }
    server.stop().await;
}
