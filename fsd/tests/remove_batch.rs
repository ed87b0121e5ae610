//! `Request::Remove` (batched unlinks and rmdirs): results in order, one per item; a failed item
//! does not stop the ones after it; the quota ledger equals a fresh scan after a batch; a large
//! file in a batch is freed on the pool, in order; each path is announced to other connections.

use bytes::Bytes;
use fsd::home::scan_usage;
use fsd::ops::AuthedSession;
use homefs_shared::{
    ErrorCode, OpenFlags, RemoveItem, RemoveKind, Request, Response, WireError, WirePath, MAX_BATCH_FILES,
    MAX_DATA_BYTES,
};

mod ops_support;
use ops_support::Fixture;

#[path = "session_support/mod.rs"]
mod session_support;

fn p(s: &str) -> WirePath {
    WirePath::new(s.as_bytes().to_vec()).expect("valid path")
}

fn file(s: &str) -> RemoveItem {
    RemoveItem { path: p(s), kind: RemoveKind::File }
}

fn dir(s: &str) -> RemoveItem {
    RemoveItem { path: p(s), kind: RemoveKind::Dir }
}

async fn ok(s: &AuthedSession, request: Request, data: &[u8]) -> Response {
    let what = format!("{request:?}");
    match s.handle(request, Bytes::copy_from_slice(data)).await {
        Ok((r, _)) => r,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

async fn put(s: &AuthedSession, path: &str, len: usize) {
    let request = Request::PutFile { path: p(path), mode: 0o644, mtime: None, exclusive: false };
    ok(s, request, &vec![7u8; len]).await;
}

async fn mkdir(s: &AuthedSession, path: &str) {
    ok(s, Request::Mkdir { path: p(path), mode: 0o755 }, b"").await;
}

/// The results' codes: `None` for `Ok`.
async fn remove(s: &AuthedSession, items: Vec<RemoveItem>) -> Vec<Option<ErrorCode>> {
    let n = items.len();
    match ok(s, Request::Remove { items }, b"").await {
        Response::Removed { results } => {
            assert_eq!(results.len(), n, "one result per item");
            results.into_iter().map(|r| r.err().map(|e: WireError| e.code)).collect()
        }
        other => panic!("Remove answered {other:?}"),
    }
}

async fn used(s: &AuthedSession) -> u64 {
    match ok(s, Request::StatFs, b"").await {
        Response::StatFs(st) => st.used_bytes,
        other => panic!("StatFs answered {other:?}"),
    }
}

/// Items run in order and each failure is its own: the rmdir of `d` fails while its files are
/// there and succeeds when repeated after them; the hard-linked file frees its size only with
/// its last link. Run on a multi-thread runtime (items inline) and on a current-thread one (no
/// inline slot: all on the pool): the same answers.
async fn in_order_each_failure_its_own() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    mkdir(&s, "d").await;
    mkdir(&s, "d/sub").await;
    put(&s, "d/a", 100).await;
    put(&s, "d/b", 200).await;
    put(&s, "c", 300).await;
    ok(&s, Request::Link { from: p("c"), to: p("c2") }, b"").await;
    assert_eq!(used(&s).await, 600);
    let results = remove(
        &s,
        vec![
            file("d/a"),
            file("d/missing"),
            file("d/sub"),
            dir("d"),
            file("d/b"),
            dir("d/sub"),
            dir("d"),
            file("c"),
            file("c2"),
        ],
    )
    .await;
    use ErrorCode::{IsDir, NotEmpty, NotFound};
    assert_eq!(
        results,
        vec![None, Some(NotFound), Some(IsDir), Some(NotEmpty), None, None, None, None, None],
        "each item's own outcome, in order"
    );
    let home = f.home("alice");
    assert!(!home.join("d").exists() && !home.join("c").exists() && !home.join("c2").exists());
    assert_eq!(used(&s).await, 0, "every byte freed once");
    assert_eq!(scan_usage(&home).expect("scan"), 0, "the ledger equals a fresh scan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_in_order_and_a_failed_item_does_not_stop_the_rest_inline() {
    in_order_each_failure_its_own().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_runs_in_order_and_a_failed_item_does_not_stop_the_rest_on_the_pool() {
    in_order_each_failure_its_own().await;
}

/// A batch longer than one inline chunk, with a file too large to free inline in the middle
/// (it goes to the pool with the rest of its chunk, in order: the rmdir last succeeds only if
/// every file before it is gone): everything removed, the quota exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_and_many_small_ones_in_one_batch_are_freed_in_order() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 30).await;
    mkdir(&s, "t").await;
    let mut items = Vec::new();
    for i in 0..150 {
        let name = format!("t/f{i}");
        put(&s, &name, 10).await;
        items.push(file(&name));
    }
    // 20 MiB of real blocks: more than inline.rs's INLINE_FREE_MAX_BYTES (16 MiB).
    let flags = OpenFlags { write: true, create: true, ..OpenFlags::default() };
    let fh = match ok(&s, Request::Open { path: p("t/large"), flags, mode: 0o644 }, b"").await {
        Response::Opened { fh, .. } => fh,
        other => panic!("open: {other:?}"),
    };
    let chunk = vec![1u8; MAX_DATA_BYTES as usize];
    for i in 0..5u64 {
        ok(&s, Request::Write { fh, offset: i * u64::from(MAX_DATA_BYTES) }, &chunk).await;
    }
    ok(&s, Request::Close { fh }, b"").await;
    let large = 5 * u64::from(MAX_DATA_BYTES);
    assert_eq!(used(&s).await, 1500 + large);
    items.insert(70, file("t/large"));
    items.push(dir("t"));
    let results = remove(&s, items).await;
    assert!(results.iter().all(Option::is_none), "all removed: {results:?}");
    assert!(!f.home("alice").join("t").exists());
    assert_eq!(used(&s).await, 0);
    assert_eq!(scan_usage(&f.home("alice")).expect("scan"), 0, "the ledger equals a fresh scan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_the_batch_limit_is_refused_whole() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    put(&s, "x", 5).await;
    let items = (0..=MAX_BATCH_FILES).map(|_| file("x")).collect();
    let err = s.handle(Request::Remove { items }, Bytes::new()).await.expect_err("too many items");
    assert_eq!(err.code, ErrorCode::TooBig);
    assert!(f.home("alice").join("x").exists(), "nothing removed");
    assert_eq!(used(&s).await, 5);
}

/// Another connection of the user is told of every path of the batch.
#[tokio::test]
async fn each_path_of_a_batch_is_announced() {
    use session_support::{granted, Instance, Server, WAIT};
    let inst = Instance::new("remove-notices");
    inst.add_user("alice", "pw");
    let server = Server::start(inst.config()).await;
    let (mut a, mut b) = (server.connect().await, server.connect().await);
    granted(&a.login("alice", "pw").await);
    granted(&b.login("alice", "pw").await);
    assert_eq!(a.call(Request::Subscribe).await, Ok(Response::Done));
    b.call(Request::Mkdir { path: p("d"), mode: 0o755 }).await.expect("mkdir");
    for name in ["d/x", "d/y"] {
        let id =
            b.send_with(Request::PutFile { path: p(name), mode: 0o644, mtime: None, exclusive: false }, b"1").await;
        let (header, _) = b.recv().await;
        assert!(header.id == id && header.result.is_ok(), "put {name}: {header:?}");
    }
    let answer = b.call(Request::Remove { items: vec![file("d/x"), file("d/y"), dir("d")] }).await;
    assert_eq!(answer, Ok(Response::Removed { results: vec![Ok(()), Ok(()), Ok(())] }));
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = std::collections::BTreeSet::new();
    while !["d/x", "d/y", "d"].iter().all(|w| seen.contains(*w)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let frame = tokio::time::timeout(left, a.next_frame())
            .await
            .unwrap_or_else(|_| panic!("waited {WAIT:?} for notices of d/x, d/y and d; got {seen:?}"))
            .expect("the connection stays open");
        if let Ok(Response::Changed { paths, .. }) = frame.response().expect("a response").result {
            seen.extend(paths.iter().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()));
        }
    }
    server.stop().await;
}

/// While a write on the pool holds the user's size lock, a batch does not wait for it on the
/// runtime thread: the items go to the pool, wait there, and all succeed once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_finding_the_size_lock_held_finishes_on_the_pool() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    for name in ["a", "b", "c"] {
        put(&s, name, 10).await;
    }
    let quota = std::sync::Arc::clone(&s.home().quota);
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _guard = quota.size_lock();
        held_tx.send(()).expect("the test waits for the lock to be held");
        // Held until the test says so (or gives up), as a slow write on the pool would.
        let _ = release_rx.recv_timeout(std::time::Duration::from_secs(30));
    });
    held_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the size lock taken");
    let batch = tokio::spawn(async move {
        let results = remove(&s, vec![file("a"), file("b"), file("c")]).await;
        (s, results)
    });
    // Time for the batch to meet the held lock (not a synchronisation: it cannot finish before
    // the release whatever the timing).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!batch.is_finished(), "the batch cannot finish while the size lock is held");
    release_tx.send(()).expect("the holder waits");
    let (s, results) = tokio::time::timeout(std::time::Duration::from_secs(30), batch)
        .await
        .expect("the batch finishes once the lock is released")
        .expect("no panic");
    holder.join().expect("holder thread");
    assert_eq!(results, vec![None, None, None], "all removed, none answered EIO (Busy)");
    assert_eq!(used(&s).await, 0);
    assert_eq!(scan_usage(&f.home("alice")).expect("scan"), 0);
}
