//! The whole-file requests through `AuthedSession::handle` against a storage root in a temp dir:
//! PutFile (quota exact and over, replace vs exclusive, a symlink at the target replaced and not
//! followed, jail escapes refused, no temporary file ever left), GetFile and SyncFs.

use bytes::Bytes;
use fsd::home::scan_usage;
use fsd::ops::AuthedSession;
use homefs_shared::{Attr, ErrorCode, FileKind, Request, Response, Timestamp, WirePath};
use std::path::{Path, PathBuf};

mod ops_support;
use ops_support::Fixture;

fn p(s: &str) -> WirePath {
    WirePath::new(s.as_bytes().to_vec()).expect("valid path")
}

/// Every temporary or partial file anywhere under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".homefs-part") {
                found.push(e.path());
            }
        }
    }
    found
}

fn put(path: &str, exclusive: bool) -> Request {
    Request::PutFile { path: p(path), mode: 0o640, mtime: None, exclusive }
}

async fn put_ok(s: &AuthedSession, request: Request, data: &[u8]) -> Attr {
    let what = format!("{request:?}");
    match s.handle(request, Bytes::copy_from_slice(data)).await {
        Ok((Response::Stored { hash, attr }, _)) => {
            assert_eq!(&hash, blake3::hash(data).as_bytes(), "{what}: the hash of what was stored");
            attr
        }
        other => panic!("{what} answered {other:?}"),
    }
}

async fn put_err(s: &AuthedSession, request: Request, data: &[u8]) -> ErrorCode {
    let what = format!("{request:?}");
    match s.handle(request, Bytes::copy_from_slice(data)).await {
        Ok(r) => panic!("{what} succeeded with {:?}, expected an error", r.0),
        Err(e) => e.code,
    }
}

async fn used(s: &AuthedSession) -> u64 {
    match s.handle(Request::StatFs, Bytes::new()).await {
        Ok((Response::StatFs(st), _)) => st.used_bytes,
        other => panic!("StatFs answered {other:?}"),
    }
}

#[tokio::test]
async fn put_file_is_charged_exactly_and_refused_over_quota() {
    let f = Fixture::new();
    let s = f.session("alice", 1000).await;
    let home = f.home("alice");
    let attr = put_ok(&s, put("a", false), &[7u8; 600]).await;
    assert_eq!((attr.kind, attr.size, attr.perm), (FileKind::File, 600, 0o640));
    assert_eq!(used(&s).await, 600);
    // Exactly up to the limit fits.
    put_ok(&s, put("b", false), &[8u8; 400]).await;
    assert_eq!(used(&s).await, 1000);
    // One byte over is refused; nothing is charged or left.
    assert_eq!(put_err(&s, put("c", false), b"x").await, ErrorCode::QuotaExceeded);
    assert!(!home.join("c").exists());
    assert_eq!(used(&s).await, 1000);
    // Replacing a file gives its size back: 600 -> 500 fits although the quota is full...
    put_ok(&s, put("a", false), &[9u8; 500]).await;
    assert_eq!(used(&s).await, 900);
    // ...and 500 -> 600 fits exactly (100 bytes free), 500 -> 601 does not.
    assert_eq!(put_err(&s, put("a", false), &[1u8; 601]).await, ErrorCode::QuotaExceeded);
    assert_eq!(std::fs::read(home.join("a")).expect("a"), vec![9u8; 500], "a refused put changed the file");
    assert_eq!(used(&s).await, 900);
    put_ok(&s, put("a", false), &[1u8; 600]).await;
    assert_eq!(used(&s).await, 1000);
    // Exclusive replaces nothing, so nothing is given back.
    assert_eq!(put_err(&s, put("b", true), b"").await, ErrorCode::Exists);
    assert_eq!(used(&s).await, 1000);
    assert_eq!(scan_usage(&home).expect("scan"), 1000, "the ledger equals a fresh scan");
    assert!(temp_files(&home).is_empty(), "temporary files left: {:?}", temp_files(&home));
}

#[tokio::test]
async fn put_file_replaces_unless_exclusive_and_sets_mode_and_mtime() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    let home = f.home("alice");
    put_ok(&s, put("f", true), b"first").await;
    assert_eq!(put_err(&s, put("f", true), b"second").await, ErrorCode::Exists);
    assert_eq!(std::fs::read(home.join("f")).expect("f"), b"first");
    let mtime = Timestamp { secs: 1_600_000_000, nanos: 5 };
    let attr =
        put_ok(&s, Request::PutFile { path: p("f"), mode: 0o4751, mtime: Some(mtime), exclusive: false }, b"second")
            .await;
    assert_eq!(std::fs::read(home.join("f")).expect("f"), b"second");
    assert_eq!(attr.mtime, mtime);
    assert_eq!(attr.perm, 0o751, "set-id bits are not the client's to set");
    assert_eq!(used(&s).await, 6);
    // A directory at the target is not replaced; the home itself cannot be a file.
    std::fs::create_dir(home.join("d")).expect("mkdir");
    assert_eq!(put_err(&s, put("d", false), b"x").await, ErrorCode::IsDir);
    assert_eq!(put_err(&s, put(".", false), b"x").await, ErrorCode::IsDir);
    assert_eq!(put_err(&s, put("missing/f", false), b"x").await, ErrorCode::NotFound);
    assert_eq!(used(&s).await, 6);
    assert!(temp_files(&home).is_empty(), "temporary files left: {:?}", temp_files(&home));
}

#[tokio::test]
async fn put_file_replaces_a_symlink_at_the_target_without_following_it() {
    let f = Fixture::new();
    let home = f.home("alice");
    std::fs::create_dir(&home).expect("home");
    std::fs::write(home.join("victim"), b"keep me").expect("victim");
    std::os::unix::fs::symlink("victim", home.join("link")).expect("symlink");
    let out = f.outside().join("secret");
    std::os::unix::fs::symlink(&out, home.join("abs")).expect("symlink");
    std::os::unix::fs::symlink("../../outside/secret", home.join("rel")).expect("symlink");
    // Opened after the files exist, so that its ledger starts from a scan of them.
    let s = f.session("alice", 1 << 20).await;
    for name in ["link", "abs", "rel"] {
        put_ok(&s, put(name, false), b"new").await;
        let meta = std::fs::symlink_metadata(home.join(name)).expect("stat");
        assert!(meta.file_type().is_file(), "{name} is still a symlink");
        assert_eq!(std::fs::read(home.join(name)).expect("read"), b"new");
    }
    assert_eq!(std::fs::read(home.join("victim")).expect("victim"), b"keep me");
    f.assert_outside_untouched();
    assert_eq!(scan_usage(&home).expect("scan"), used(&s).await, "the ledger equals a fresh scan");
    assert!(temp_files(&home).is_empty());
}

#[tokio::test]
async fn put_and_get_file_never_leave_the_jail() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    let home = f.home("alice");
    std::os::unix::fs::symlink("../../outside", home.join("updir")).expect("symlink");
    std::os::unix::fs::symlink(f.outside(), home.join("absdir")).expect("symlink");
    std::os::unix::fs::symlink(f.outside().join("secret"), home.join("abs")).expect("symlink");
    for path in ["../outside/new", "../../outside/secret", "updir/secret", "absdir/secret", "updir/new"] {
        let code = put_err(&s, put(path, false), b"pwned").await;
        assert_eq!(code, ErrorCode::NotFound, "put {path}");
    }
    assert_eq!(put_err(&s, put("updir/..", false), b"pwned").await, ErrorCode::Invalid);
    for path in ["../outside/secret", "updir/secret", "absdir/secret", "abs"] {
        match s.handle(Request::GetFile { path: p(path), max_len: 1 << 20 }, Bytes::new()).await {
            Err(e) => assert_eq!(e.code, ErrorCode::NotFound, "get {path}"),
            Ok((r, data)) => panic!("get {path} answered {r:?} with {} bytes", data.len()),
        }
    }
    f.assert_outside_untouched();
    assert!(temp_files(&home).is_empty());
    assert!(temp_files(&f.outside()).is_empty());
}

#[tokio::test]
async fn get_file_sends_up_to_max_len_with_its_hash_and_sync_fs_answers_done() {
    let f = Fixture::new();
    let s = f.session("alice", 1 << 20).await;
    let home = f.home("alice");
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(home.join("f"), &content).expect("write");
    for (max_len, want) in [(1 << 20, content.len()), (4096, 4096), (0, 0)] {
        match s.handle(Request::GetFile { path: p("f"), max_len }, Bytes::new()).await {
            Ok((Response::FileData { attr, hash }, data)) => {
                assert_eq!(attr.size, content.len() as u64);
                assert_eq!(&data[..], &content[..want], "max_len {max_len}");
                assert_eq!(&hash, blake3::hash(&content[..want]).as_bytes());
            }
            other => panic!("GetFile answered {other:?}"),
        }
    }
    std::fs::create_dir(home.join("d")).expect("mkdir");
    match s.handle(Request::GetFile { path: p("d"), max_len: 100 }, Bytes::new()).await {
        Ok((Response::FileData { attr, .. }, data)) => {
            assert_eq!(attr.kind, FileKind::Dir);
            assert!(data.is_empty(), "a directory has no bytes to send");
        }
        other => panic!("GetFile of a directory answered {other:?}"),
    }
    let missing = s.handle(Request::GetFile { path: p("nope"), max_len: 1 }, Bytes::new()).await;
    assert_eq!(missing.expect_err("missing file").code, ErrorCode::NotFound);
    match s.handle(Request::SyncFs, Bytes::new()).await {
        Ok((Response::Done, _)) => {}
        other => panic!("SyncFs answered {other:?}"),
    }
}

/// An exclusive put on a multi-thread runtime, where it runs inline (ops/inline.rs): it refuses
/// any name that is taken without following or replacing it, sets mode and mtime, charges
/// exactly, and leaves nothing when the quota refuses it. Many at once from two sessions: each name stored once, the ledger equal to a
/// fresh scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_put_inline_refuses_what_is_there_and_charges_exactly() {
    let f = Fixture::new();
    let home = f.home("alice");
    // Taken names made on the disk before the home is opened (its scan counts the symlinks).
    std::fs::create_dir_all(home.join("d")).expect("mkdir");
    std::os::unix::fs::symlink("nowhere", home.join("dangling")).expect("symlink");
    std::os::unix::fs::symlink("n", home.join("to-n")).expect("symlink");
    let s = f.session("alice", 100_000).await;
    let mtime = Timestamp { secs: 1_500_000_000, nanos: 7 };
    let attr =
        put_ok(&s, Request::PutFile { path: p("n"), mode: 0o444, mtime: Some(mtime), exclusive: true }, b"abc").await;
    assert_eq!((attr.size, attr.perm, attr.mtime), (3, 0o444, mtime));
    assert_eq!(std::fs::read(home.join("n")).expect("n"), b"abc");
    // Taken by a file, a directory, a dangling symlink, a symlink to a file: EEXIST, all untouched.
    for taken in ["n", "d", "dangling", "to-n"] {
        assert_eq!(put_err(&s, put(taken, true), b"other").await, ErrorCode::Exists, "{taken}");
    }
    assert_eq!(std::fs::read(home.join("n")).expect("n"), b"abc");
    assert!(!home.join("nowhere").exists(), "the dangling symlink was followed");
    assert_eq!(used(&s).await, 3 + 7 + 1, "n and the two symlinks");
    // Over the quota: refused before the name exists.
    let big = vec![1u8; 100_000];
    assert_eq!(put_err(&s, put("big", true), &big).await, ErrorCode::QuotaExceeded);
    assert!(std::fs::symlink_metadata(home.join("big")).is_err(), "a refused exclusive put left its name");
    // Two sessions putting the same names at once: each name stored once, the rest EEXIST.
    let s2 = f.session("alice", 100_000).await;
    let names: Vec<String> = (0..200).map(|i| format!("d/f{}", i % 100)).collect();
    let (a, b) = names.split_at(100);
    let ra = a.iter().map(|n| s.handle(put(n, true), Bytes::from_static(b"0123456789")));
    let rb = b.iter().map(|n| s2.handle(put(n, true), Bytes::from_static(b"0123456789")));
    let (ra, rb) = tokio::join!(futures::future::join_all(ra), futures::future::join_all(rb));
    let stored = ra.iter().chain(&rb).filter(|r| r.is_ok()).count();
    let exists = ra.iter().chain(&rb).filter(|r| matches!(r, Err(e) if e.code == ErrorCode::Exists)).count();
    assert_eq!((stored, exists), (100, 100), "each of 100 names stored once");
    assert_eq!(used(&s).await, 11 + 100 * 10);
    assert_eq!(scan_usage(&home).expect("scan"), 11 + 100 * 10, "the ledger equals a fresh scan");
    assert!(temp_files(&home).is_empty(), "temporary files left: {:?}", temp_files(&home));
}
