//! File operations through `AuthedSession::handle`, the API the session layer calls, against a
//! storage root in a temp dir: jail escapes, path limits, non-UTF-8 names, paged directories,
//! quota, locks, copy and checksum. No network; passes as root and as an ordinary user.

use bytes::Bytes;
use fsd::home::scan_usage;
use fsd::ops::AuthedSession;
use homefs_shared::{
    Attr, ErrorCode, Fh, FileKind, LockKind, LockSpec, OpenFlags, RenameFlags, Request, Response, SetAttr, WirePath,
};
use serde::Deserialize;

use std::sync::atomic::Ordering;
use std::sync::Arc;

mod ops_support;
use ops_support::Fixture;

/// Log lines written by a test's own subscriber, to check what the server logs.
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

/// A path exactly as a peer could send it: unchecked, so NUL, empty and over-long paths can be
/// sent (the wire form is only bytes; the server must check).
fn p(bytes: impl AsRef<[u8]>) -> WirePath {
    let seq = serde::de::value::SeqDeserializer::<_, serde::de::value::Error>::new(bytes.as_ref().iter().copied());
    WirePath::deserialize(seq).expect("bytes deserialize as a path")
}

async fn ok(s: &AuthedSession, request: Request) -> Response {
    ok_data(s, request, Bytes::new()).await.0
}

async fn ok_data(s: &AuthedSession, request: Request, data: Bytes) -> (Response, Bytes) {
    let what = format!("{request:?}");
    s.handle(request, data).await.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

async fn err(s: &AuthedSession, request: Request) -> ErrorCode {
    err_data(s, request, Bytes::new()).await
}

async fn err_data(s: &AuthedSession, request: Request, data: Bytes) -> ErrorCode {
    let what = format!("{request:?}");
    match s.handle(request, data).await {
        Ok(r) => panic!("{what} succeeded with {:?}, expected an error", r.0),
        Err(e) => e.code,
    }
}

fn rw_create() -> OpenFlags {
    OpenFlags { read: true, write: true, create: true, ..OpenFlags::default() }
}

async fn open(s: &AuthedSession, path: &str, flags: OpenFlags) -> Fh {
    match ok(s, Request::Open { path: p(path), flags, mode: 0o644 }).await {
        Response::Opened { fh, .. } => fh,
        other => panic!("open answered {other:?}"),
    }
}

async fn write(s: &AuthedSession, fh: Fh, offset: u64, data: &[u8]) -> u64 {
    match ok_data(s, Request::Write { fh, offset }, Bytes::copy_from_slice(data)).await.0 {
        Response::Written { len, size } => {
            assert_eq!(len as usize, data.len());
            size
        }
        other => panic!("write answered {other:?}"),
    }
}

async fn read(s: &AuthedSession, fh: Fh, offset: u64, len: u32) -> Bytes {
    match ok_data(s, Request::Read { fh, offset, len }, Bytes::new()).await {
        (Response::Data { .. }, data) => data,
        other => panic!("read answered {other:?}"),
    }
}

async fn put(s: &AuthedSession, path: &str, data: &[u8]) {
    let fh = open(s, path, OpenFlags { truncate: true, ..rw_create() }).await;
    write(s, fh, 0, data).await;
    ok(s, Request::Close { fh }).await;
}

async fn stat(s: &AuthedSession, path: impl AsRef<[u8]>) -> Attr {
    match ok(s, Request::Stat { path: p(path) }).await {
        Response::Attr(a) => a,
        other => panic!("stat answered {other:?}"),
    }
}

async fn used(s: &AuthedSession) -> u64 {
    match ok(s, Request::StatFs).await {
        Response::StatFs(fs) => fs.used_bytes,
        other => panic!("statfs answered {other:?}"),
    }
}

mod jail {
    use super::*;

    #[tokio::test]
    async fn dotdot_and_absolute_paths_stay_inside() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let outside = f.outside().join("secret");
        let abs = outside.to_str().expect("utf-8 temp path");
        for path in ["../outside/secret", "../../outside/secret", "a/../../../outside/secret", abs] {
            assert_eq!(err(&s, Request::Stat { path: p(path) }).await, ErrorCode::NotFound, "{path}");
            let flags = OpenFlags { read: true, ..OpenFlags::default() };
            assert_eq!(err(&s, Request::Open { path: p(path), flags, mode: 0 }).await, ErrorCode::NotFound, "{path}");
            let req = Request::Checksum { path: p(path), start: 0, end: u64::MAX };
            assert_eq!(err(&s, req).await, ErrorCode::NotFound, "{path}");
            assert_eq!(err(&s, Request::Unlink { path: p(path) }).await, ErrorCode::NotFound, "{path}");
        }
        // Creating through `..` lands in the home, whose `..` is itself.
        put(&s, "../../escaped", b"x").await;
        assert!(f.home("alice").join("escaped").exists());
        ok(&s, Request::Mkdir { path: p("/../made"), mode: 0o755 }).await;
        assert!(f.home("alice").join("made").is_dir());
        assert_eq!(stat(&s, "..").await.ino, stat(&s, ".").await.ino, "the home's `..` is the home");
        assert_eq!(stat(&s, "/").await.kind, FileKind::Dir);
        f.assert_outside_untouched();
    }

    #[tokio::test]
    async fn symlinks_out_of_the_home_resolve_inside_it() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let outside = f.outside();
        let abs_dir = outside.to_str().expect("utf-8").as_bytes().to_vec();
        let abs_file = outside.join("secret").to_str().expect("utf-8").as_bytes().to_vec();
        ok(&s, Request::Symlink { target: b"/etc".to_vec(), path: p("sysconf") }).await;
        ok(&s, Request::Symlink { target: b"../..".to_vec(), path: p("up") }).await;
        ok(&s, Request::Symlink { target: abs_dir, path: p("outdir") }).await;
        ok(&s, Request::Symlink { target: abs_file, path: p("outfile") }).await;
        ok(&s, Request::Symlink { target: b"/proc/self/root/etc/passwd".to_vec(), path: p("magic") }).await;
        // The links are stored as given and stat (lstat) shows them as links.
        assert_eq!(stat(&s, "sysconf").await.kind, FileKind::Symlink);
        assert_eq!(ok(&s, Request::ReadLink { path: p("sysconf") }).await, Response::Target(b"/etc".to_vec()));
        let read_only = OpenFlags { read: true, ..OpenFlags::default() };
        for path in ["sysconf/passwd", "up/outside/secret", "outdir/secret", "outfile", "magic"] {
            let e = err(&s, Request::Open { path: p(path), flags: read_only, mode: 0 }).await;
            assert_eq!(e, ErrorCode::NotFound, "open {path}");
            let e = err(&s, Request::Checksum { path: p(path), start: 0, end: 100 }).await;
            assert_eq!(e, ErrorCode::NotFound, "checksum {path}");
        }
        for path in ["sysconf/passwd", "up/outside/secret", "outdir/secret"] {
            assert_eq!(err(&s, Request::Stat { path: p(path) }).await, ErrorCode::NotFound, "stat {path}");
        }
        for path in ["sysconf/new", "outdir/new", "up/outside/new"] {
            let e = err(&s, Request::Mkdir { path: p(path), mode: 0o755 }).await;
            assert_eq!(e, ErrorCode::NotFound, "mkdir {path}");
            let e = err(&s, Request::Open { path: p(path), flags: rw_create(), mode: 0o644 }).await;
            assert_eq!(e, ErrorCode::NotFound, "create {path}");
        }
        let e = err(&s, Request::ReadDir { path: p("outdir"), after: None, max_entries: 10 }).await;
        assert_eq!(e, ErrorCode::NotFound);
        // A link to "/etc" named "etc" resolves to itself: a loop, not the system's /etc.
        ok(&s, Request::Symlink { target: b"/etc".to_vec(), path: p("etc") }).await;
        assert_eq!(err(&s, Request::Stat { path: p("etc/passwd") }).await, ErrorCode::Loop);
        f.assert_outside_untouched();
    }

    #[tokio::test]
    async fn hard_links_never_reach_outside() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let abs_dir = f.outside().to_str().expect("utf-8").as_bytes().to_vec();
        let abs_file = f.outside().join("secret").to_str().expect("utf-8").as_bytes().to_vec();
        ok(&s, Request::Symlink { target: abs_dir, path: p("outdir") }).await;
        ok(&s, Request::Symlink { target: abs_file, path: p("outfile") }).await;
        let e = err(&s, Request::Link { from: p("outdir/secret"), to: p("stolen") }).await;
        assert_eq!(e, ErrorCode::NotFound);
        // Linking a symlink links the symlink itself, never its target.
        match ok(&s, Request::Link { from: p("outfile"), to: p("stolen") }).await {
            Response::Attr(a) => assert_eq!(a.kind, FileKind::Symlink),
            other => panic!("link answered {other:?}"),
        }
        let read_only = OpenFlags { read: true, ..OpenFlags::default() };
        assert_eq!(err(&s, Request::Open { path: p("stolen"), flags: read_only, mode: 0 }).await, ErrorCode::NotFound);
        let abs = f.outside().join("secret");
        let abs = abs.to_str().expect("utf-8");
        assert_eq!(err(&s, Request::Link { from: p(abs), to: p("stolen2") }).await, ErrorCode::NotFound);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(f.outside().join("secret")).expect("secret").nlink(), 1);
        f.assert_outside_untouched();
    }

    /// A thread keeps exchanging the directory `d` with a symlink to the outside (absolute, then
    /// relative, by `renameat2(RENAME_EXCHANGE)`) while requests open, stat, checksum and create
    /// beneath `d`. Whatever the kernel sees mid-lookup, nothing outside is read or created.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_swapped_for_a_symlink_mid_lookup_never_leads_outside() {
        use std::sync::atomic::AtomicBool;
        const INSIDE: &[u8] = b"inside";
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        ok(&s, Request::Mkdir { path: p("d"), mode: 0o755 }).await;
        put(&s, "d/secret", INSIDE).await;
        let abs = f.outside().to_str().expect("utf-8").as_bytes().to_vec();
        ok(&s, Request::Symlink { target: abs, path: p("l_abs") }).await;
        ok(&s, Request::Symlink { target: b"../../outside".to_vec(), path: p("l_rel") }).await;

        let stop = Arc::new(AtomicBool::new(false));
        let home = rustix::fs::open(
            f.home("alice"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open home");
        let swapper = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let exchange = rustix::fs::RenameFlags::EXCHANGE;
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let link = if swaps % 2 == 0 { "l_abs" } else { "l_rel" };
                    // `d` is the symlink between these two calls, the directory otherwise.
                    rustix::fs::renameat_with(&home, "d", &home, link, exchange).expect("swap in the link");
                    std::thread::yield_now();
                    rustix::fs::renameat_with(&home, "d", &home, link, exchange).expect("swap back");
                    swaps += 1;
                    std::thread::yield_now();
                }
                swaps
            }
        });

        let read_only = OpenFlags { read: true, ..OpenFlags::default() };
        let inside_sum = blake3::hash(INSIDE);
        let (mut found, mut missed) = (0u32, 0u32);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut i = 0u32;
        while i < 600 || found == 0 || missed == 0 {
            assert!(std::time::Instant::now() < deadline, "the race was not exercised: {found} found, {missed} missed");
            match s.handle(Request::Open { path: p("d/secret"), flags: read_only, mode: 0 }, Bytes::new()).await {
                Ok((Response::Opened { fh, .. }, _)) => {
                    assert_eq!(read(&s, fh, 0, 100).await, INSIDE, "opened something other than d/secret");
                    ok(&s, Request::Close { fh }).await;
                    found += 1;
                }
                Ok((other, _)) => panic!("open answered {other:?}"),
                // NotFound while `d` is the link; with the relative link's `..` the kernel may
                // also answer EAGAIN past the jail's retries, as renames race with the walk.
                Err(_) => missed += 1,
            }
            if let Ok((Response::Attr(a), _)) = s.handle(Request::Stat { path: p("d/secret") }, Bytes::new()).await {
                assert_eq!(a.size, INSIDE.len() as u64, "stat saw another file");
            }
            let sum = Request::Checksum { path: p("d/secret"), start: 0, end: u64::MAX };
            if let Ok((Response::Checksum { hash, .. }, _)) = s.handle(sum, Bytes::new()).await {
                assert_eq!(hash, *inside_sum.as_bytes(), "checksum of another file");
            }
            let name = format!("d/new{i}");
            let create = Request::Open { path: p(&name), flags: rw_create(), mode: 0o644 };
            if let Ok((Response::Opened { fh, .. }, _)) = s.handle(create, Bytes::new()).await {
                ok(&s, Request::Close { fh }).await;
            }
            let _ = s.handle(Request::Mkdir { path: p(format!("d/dir{i}")), mode: 0o755 }, Bytes::new()).await;
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().expect("swapper");
        assert!(swaps > 0);
        f.assert_outside_untouched();
    }

    #[tokio::test]
    async fn dotdot_as_the_last_name_is_refused_for_changes() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        ok(&s, Request::Mkdir { path: p("a"), mode: 0o755 }).await;
        assert_eq!(err(&s, Request::Rmdir { path: p("a/..") }).await, ErrorCode::Invalid);
        assert_eq!(err(&s, Request::Unlink { path: p("..") }).await, ErrorCode::Invalid);
        let e = err(&s, Request::Rename { from: p("a/.."), to: p("b"), flags: RenameFlags::default() }).await;
        assert_eq!(e, ErrorCode::Invalid);
        assert_eq!(err(&s, Request::Rmdir { path: p(".") }).await, ErrorCode::Invalid);
        assert_eq!(err(&s, Request::Mkdir { path: p("."), mode: 0o755 }).await, ErrorCode::Exists);
        assert_eq!(stat(&s, "a/..").await.ino, stat(&s, ".").await.ino);
        f.assert_outside_untouched();
    }

    #[tokio::test]
    async fn bad_names_get_clear_codes() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        assert_eq!(err(&s, Request::Stat { path: p(b"a\0b") }).await, ErrorCode::Invalid);
        assert_eq!(err(&s, Request::Mkdir { path: p(b"a\0b"), mode: 0o755 }).await, ErrorCode::Invalid);
        assert_eq!(err(&s, Request::Stat { path: p(b"") }).await, ErrorCode::NotFound);
        let e = err(&s, Request::Open { path: p(b""), flags: rw_create(), mode: 0o644 }).await;
        assert_eq!(e, ErrorCode::NotFound);
        assert_eq!(err(&s, Request::Mkdir { path: p(vec![b'n'; 256]), mode: 0o755 }).await, ErrorCode::NameTooLong);
        ok(&s, Request::Mkdir { path: p(vec![b'n'; 255]), mode: 0o755 }).await;
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".as_slice(), 1025).flatten().copied().collect();
        assert_eq!(err(&s, Request::Stat { path: p(long) }).await, ErrorCode::NameTooLong);
        let e = err(&s, Request::Symlink { target: b"a\0b".to_vec(), path: p("l") }).await;
        assert_eq!(e, ErrorCode::Invalid);
    }
}

mod names {
    use super::*;

    async fn listing(s: &AuthedSession, path: &str, page: u32) -> Vec<homefs_shared::DirEntry> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let request = Request::ReadDir { path: p(path), after: after.clone(), max_entries: page };
            let Response::Entries { entries, more } = ok(s, request.clone()).await else { panic!("readdir") };
            // Each page's header stays under the protocol's bound for headers.
            let header = homefs_shared::ResponseHeader {
                id: homefs_shared::RequestId(1),
                result: Ok(Response::Entries { entries: entries.clone(), more }),
            };
            let prefix = homefs_shared::frame::encode_prefix(&header, 0, homefs_shared::MAX_FRAME_BYTES)
                .expect("encodable page");
            assert!(prefix.len() - 8 < homefs_shared::MAX_HEADER_BYTES as usize, "page too large");
            assert!(entries.len() <= 4096);
            after = entries.last().map(|e| e.name.clone()).or(after);
            all.extend(entries);
            if !more {
                return all;
            }
        }
    }

    #[tokio::test]
    async fn non_utf8_names_round_trip() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        ok(&s, Request::Mkdir { path: p(b"caf\xe9"), mode: 0o755 }).await;
        put(&s, "caf\u{e9}-utf8", b"u").await;
        let name = b"caf\xe9/\xff\xfe name".to_vec();
        let fh = open(&s, "x", rw_create()).await;
        ok(&s, Request::Close { fh }).await;
        ok(&s, Request::Rename { from: p("x"), to: p(&name), flags: RenameFlags::default() }).await;
        assert_eq!(stat(&s, &name).await.kind, FileKind::File);
        let names: Vec<Vec<u8>> = listing(&s, "/", 100).await.into_iter().map(|e| e.name).collect();
        // Bytewise: "caf\u{e9}" in UTF-8 is caf\xc3\xa9, which sorts before caf\xe9.
        assert_eq!(names, vec!["caf\u{e9}-utf8".as_bytes().to_vec(), b"caf\xe9".to_vec()]);
        let Response::Entries { entries, .. } =
            ok(&s, Request::ReadDir { path: p(b"caf\xe9"), after: None, max_entries: 9 }).await
        else {
            panic!("readdir")
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, b"\xff\xfe name");
        ok(&s, Request::Rename { from: p(&name), to: p(b"\x80"), flags: RenameFlags::default() }).await;
        use std::os::unix::ffi::OsStrExt;
        assert!(f.home("alice").join(std::ffi::OsStr::from_bytes(b"\x80")).exists(), "raw bytes on disk");
    }

    #[tokio::test]
    async fn ten_thousand_entries_in_pages_equal_the_sorted_listing() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let dir = f.home("alice").join("big");
        std::fs::create_dir(&dir).expect("mkdir");
        let mut expected = Vec::new();
        for i in 0..10_000u32 {
            // Some long names, so that pages are also cut by their size, not only their count.
            let name = if i % 10 == 0 { format!("{i:05}-{}", "l".repeat(240)) } else { format!("f{i}") };
            std::fs::File::create(dir.join(&name)).expect("create");
            expected.push(name.into_bytes());
        }
        expected.sort();
        for page in [1000, u32::MAX] {
            let got: Vec<Vec<u8>> = listing(&s, "big", page).await.into_iter().map(|e| e.name).collect();
            assert_eq!(got.len(), expected.len(), "page size {page}");
            assert!(got == expected, "page size {page}: listing differs");
        }
        let Response::Entries { entries, more } =
            ok(&s, Request::ReadDir { path: p("big"), after: None, max_entries: u32::MAX }).await
        else {
            panic!("readdir")
        };
        assert!(more && entries.len() < 4096, "a page of long names is cut by its size ({} entries)", entries.len());
    }
}

mod files {
    use super::*;

    #[tokio::test]
    async fn open_read_write_append_and_handles() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let fh = open(&s, "f", rw_create()).await;
        assert_eq!(write(&s, fh, 0, b"hello").await, 5);
        assert_eq!(&read(&s, fh, 0, 100).await[..], b"hello", "short only at EOF");
        assert_eq!(&read(&s, fh, 1, 3).await[..], b"ell");
        ok(&s, Request::Fsync { fh, datasync: false }).await;
        ok(&s, Request::Close { fh }).await;
        assert_eq!(err(&s, Request::Read { fh, offset: 0, len: 1 }).await, ErrorCode::BadHandle);
        let app = open(&s, "f", OpenFlags { append: true, ..OpenFlags::default() }).await;
        assert!(app.0 > fh.0, "handle numbers are never reused");
        assert_eq!(write(&s, app, 0, b" world").await, 11, "append writes at the end");
        ok(&s, Request::Close { fh: app }).await;
        assert_eq!(std::fs::read(f.home("alice").join("f")).expect("file"), b"hello world");
        let excl = OpenFlags { exclusive: true, ..rw_create() };
        assert_eq!(err(&s, Request::Open { path: p("f"), flags: excl, mode: 0o600 }).await, ErrorCode::Exists);
        ok(&s, Request::Mkdir { path: p("d"), mode: 0o755 }).await;
        let w = OpenFlags { write: true, ..OpenFlags::default() };
        assert_eq!(err(&s, Request::Open { path: p("d"), flags: w, mode: 0 }).await, ErrorCode::IsDir);
        let Response::Opened { attr, .. } =
            ok(&s, Request::Open { path: p("f"), flags: OpenFlags { truncate: true, ..w }, mode: 0 }).await
        else {
            panic!("open")
        };
        assert_eq!(attr.size, 0, "attributes after truncation");
        assert_eq!(err(&s, Request::Hello { version: 1, client: "x".into() }).await, ErrorCode::Protocol);
        assert_eq!(ok(&s, Request::Ping).await, Response::Done);
    }

    #[tokio::test]
    async fn open_files_per_session_are_bounded() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        put(&s, "f", b"x").await;
        let r = OpenFlags { read: true, ..OpenFlags::default() };
        let mut fhs = Vec::new();
        for _ in 0..fsd::ops::handles::MAX_OPEN_FILES {
            fhs.push(open(&s, "f", r).await);
        }
        assert_eq!(err(&s, Request::Open { path: p("f"), flags: r, mode: 0 }).await, ErrorCode::TooManyFiles);
        ok(&s, Request::Close { fh: fhs[0] }).await;
        open(&s, "f", r).await;
        s.end().await;
        assert_eq!(s.open_files(), 0, "ending the session closes its files");
    }

    #[tokio::test]
    async fn names_and_attributes() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        put(&s, "a", b"12345").await;
        let noreplace = RenameFlags { noreplace: true, exchange: false };
        put(&s, "b", b"67").await;
        assert_eq!(err(&s, Request::Rename { from: p("a"), to: p("b"), flags: noreplace }).await, ErrorCode::Exists);
        let exchange = RenameFlags { noreplace: false, exchange: true };
        ok(&s, Request::Rename { from: p("a"), to: p("b"), flags: exchange }).await;
        assert_eq!(stat(&s, "a").await.size, 2);
        assert_eq!(stat(&s, "b").await.size, 5);
        let set = SetAttr { mode: Some(0o600), ..SetAttr::default() };
        let Response::Attr(a) = ok(&s, Request::SetAttr { path: p("a"), fh: None, set }).await else {
            panic!("setattr")
        };
        assert_eq!(a.perm, 0o600);
        let when = homefs_shared::Timestamp { secs: 1_000_000_000, nanos: 5 };
        let set = SetAttr { mtime: Some(homefs_shared::SetTime::At(when)), ..SetAttr::default() };
        ok(&s, Request::SetAttr { path: p("a"), fh: None, set }).await;
        assert_eq!(stat(&s, "a").await.mtime, when);
        ok(&s, Request::Symlink { target: b"a".to_vec(), path: p("l") }).await;
        let set = SetAttr { mtime: Some(homefs_shared::SetTime::At(when)), ..SetAttr::default() };
        ok(&s, Request::SetAttr { path: p("l"), fh: None, set }).await;
        ok(&s, Request::Mkdir { path: p("d"), mode: 0o700 }).await;
        put(&s, "d/x", b"").await;
        assert_eq!(err(&s, Request::Rmdir { path: p("d") }).await, ErrorCode::NotEmpty);
        assert_eq!(err(&s, Request::Unlink { path: p("d") }).await, ErrorCode::IsDir);
        ok(&s, Request::Unlink { path: p("d/x") }).await;
        ok(&s, Request::Rmdir { path: p("d") }).await;
        assert_eq!(err(&s, Request::Stat { path: p("d") }).await, ErrorCode::NotFound);
    }

    /// Files belong to fsd's user, so a client never gets set-user-ID or set-group-ID bits, by
    /// create, mkdir, or chmod through a path or a handle; the sticky bit is kept.
    #[tokio::test]
    async fn set_id_bits_are_never_set() {
        let f = Fixture::new();
        let s = f.session("alice", 1 << 20).await;
        let create = Request::Open { path: p("x"), flags: rw_create(), mode: 0o6755 };
        let Response::Opened { fh, attr } = ok(&s, create).await else { panic!("open") };
        assert_eq!(attr.perm & 0o6000, 0, "created with {:o}", attr.perm);
        let Response::Attr(a) = ok(&s, Request::Mkdir { path: p("d"), mode: 0o3755 }).await else { panic!("mkdir") };
        assert_eq!(a.perm & 0o6000, 0, "mkdir made {:o}", a.perm);
        assert_eq!(a.perm & 0o1000, 0o1000, "the sticky bit is kept");
        for handle in [None, Some(fh)] {
            let set = SetAttr { mode: Some(0o6755), ..SetAttr::default() };
            let Response::Attr(a) = ok(&s, Request::SetAttr { path: p("x"), fh: handle, set }).await else {
                panic!("setattr")
            };
            assert_eq!(a.perm, 0o755, "chmod 6755 with handle {handle:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        let on_disk = std::fs::metadata(f.home("alice").join("x")).expect("x").permissions().mode();
        assert_eq!(on_disk & 0o7777, 0o755);
    }

    #[tokio::test]
    async fn copy_range_and_checksum() {
        let f = Fixture::new();
        let s = f.session("alice", 64 << 20).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        put(&s, "src", &data).await;
        let src = open(&s, "src", OpenFlags { read: true, ..OpenFlags::default() }).await;
        let dst = open(&s, "dst", rw_create()).await;
        let Response::Copied { len } =
            ok(&s, Request::CopyRange { src, src_offset: 100, dst, dst_offset: 10, len: 2_000_000 }).await
        else {
            panic!("copy")
        };
        assert_eq!(len, 2_000_000);
        let tail = Request::CopyRange { src, src_offset: 2_999_000, dst, dst_offset: 0, len: 1 << 30 };
        assert_eq!(ok(&s, tail).await, Response::Copied { len: 1000 }, "cut at the source's end");
        ok(&s, Request::Close { fh: dst }).await;
        let got = std::fs::read(f.home("alice").join("dst")).expect("dst");
        assert_eq!(got.len(), 2_000_010);
        assert!(got[..1000] == data[2_999_000..], "the tail copy landed at 0");
        assert!(got[1000..] == data[1090..2_000_100], "the first copy landed at 10");
        assert_eq!(used(&s).await, 3_000_000 + 2_000_010);

        for (start, end) in [(0u64, u64::MAX), (5, 1_500_005), (2_999_999, 4_000_000), (7, 7)] {
            let Response::Checksum { hash, len, size, .. } =
                ok(&s, Request::Checksum { path: p("src"), start, end }).await
            else {
                panic!("checksum")
            };
            let e = (end.min(data.len() as u64)) as usize;
            assert_eq!(hash, *blake3::hash(&data[start as usize..e]).as_bytes(), "[{start}, {end})");
            assert_eq!(len, (e - start as usize) as u64);
            assert_eq!(size, data.len() as u64);
        }
        let past = ok(&s, Request::Checksum { path: p("src"), start: 5_000_000, end: 6_000_000 }).await;
        assert!(matches!(past, Response::Checksum { len: 0, .. }));
    }
}

mod quota {
    use super::*;

    #[tokio::test]
    async fn exactly_at_the_limit_then_one_byte_over() {
        let f = Fixture::new();
        let s = f.session("alice", 1000).await;
        let fh = open(&s, "f", rw_create()).await;
        assert_eq!(write(&s, fh, 0, &[1u8; 1000]).await, 1000);
        assert_eq!(used(&s).await, 1000);
        let data = Bytes::from_static(b"!");
        let e = s.handle(Request::Write { fh, offset: 1000 }, data.clone()).await.expect_err("one byte over");
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(e.message, "needs 1 B, 0 B free");
        assert_eq!(err_data(&s, Request::Write { fh, offset: 5000 }, data).await, ErrorCode::QuotaExceeded);
        assert_eq!(std::fs::read(f.home("alice").join("f")).expect("f"), vec![1u8; 1000], "nothing written");
        // Overwriting inside the file needs no quota.
        write(&s, fh, 10, b"abc").await;
        let Response::StatFs(fs) = ok(&s, Request::StatFs).await else { panic!("statfs") };
        assert_eq!((fs.total_bytes, fs.used_bytes, fs.free_bytes), (1000, 1000, 0));
    }

    #[tokio::test]
    async fn truncate_up_and_sparse_writes_count() {
        let f = Fixture::new();
        let s = f.session("alice", 10_000).await;
        let fh = open(&s, "f", rw_create()).await;
        let grow = SetAttr { size: Some(10_001), ..SetAttr::default() };
        assert_eq!(err(&s, Request::SetAttr { path: p("f"), fh: Some(fh), set: grow }).await, ErrorCode::QuotaExceeded);
        assert_eq!(err(&s, Request::SetAttr { path: p("f"), fh: None, set: grow }).await, ErrorCode::QuotaExceeded);
        let grow = SetAttr { size: Some(6000), ..SetAttr::default() };
        ok(&s, Request::SetAttr { path: p("f"), fh: None, set: grow }).await;
        assert_eq!(used(&s).await, 6000);
        assert_eq!(
            err_data(&s, Request::Write { fh, offset: 9_999 }, Bytes::from_static(b"ab")).await,
            ErrorCode::QuotaExceeded
        );
        assert_eq!(stat(&s, "f").await.size, 6000, "nothing written");
        write(&s, fh, 9_999, b"a").await;
        assert_eq!(used(&s).await, 10_000, "a sparse write counts its apparent size");
        let shrink = SetAttr { size: Some(100), ..SetAttr::default() };
        ok(&s, Request::SetAttr { path: p("f"), fh: Some(fh), set: shrink }).await;
        assert_eq!(used(&s).await, 100);
        let big = f.session("bob", 1 << 40).await;
        let fh = open(&big, "sparse", rw_create()).await;
        write(&big, fh, 1 << 35, b"x").await;
        assert_eq!(used(&big).await, (1 << 35) + 1);
        assert_eq!(scan_usage(&f.home("bob")).expect("scan"), (1 << 35) + 1);
    }

    #[tokio::test]
    async fn delete_rename_link_and_truncate_free_exactly() {
        let f = Fixture::new();
        let s = f.session("alice", 1000).await;
        put(&s, "a", &[0u8; 600]).await;
        ok(&s, Request::Unlink { path: p("a") }).await;
        assert_eq!(used(&s).await, 0, "delete frees at once");
        put(&s, "a", &[0u8; 600]).await;
        ok(&s, Request::Link { from: p("a"), to: p("a2") }).await;
        assert_eq!(used(&s).await, 600, "a hard link counts once");
        ok(&s, Request::Unlink { path: p("a") }).await;
        assert_eq!(used(&s).await, 600, "the other link keeps the file");
        put(&s, "c", &[0u8; 300]).await;
        ok(&s, Request::Rename { from: p("c"), to: p("a2"), flags: RenameFlags::default() }).await;
        assert_eq!(used(&s).await, 300, "a replaced file is freed");
        let fh = open(&s, "a2", OpenFlags { write: true, truncate: true, ..OpenFlags::default() }).await;
        assert_eq!(used(&s).await, 0, "truncate on open frees");
        write(&s, fh, 0, &[1u8; 990]).await;
        ok(&s, Request::Symlink { target: b"0123456789".to_vec(), path: p("l") }).await;
        assert_eq!(used(&s).await, 1000, "a symlink counts its target's length");
        let e = err(&s, Request::Symlink { target: b"x".to_vec(), path: p("l2") }).await;
        assert_eq!(e, ErrorCode::QuotaExceeded);
        ok(&s, Request::Close { fh }).await;
        assert_eq!(scan_usage(&f.home("alice")).expect("scan"), 1000);
    }

    #[tokio::test]
    async fn an_unlinked_open_file_is_freed_but_stays_bounded() {
        let f = Fixture::new();
        let s = f.session("alice", 1000).await;
        let fh = open(&s, "f", rw_create()).await;
        write(&s, fh, 0, &[1u8; 400]).await;
        ok(&s, Request::Unlink { path: p("f") }).await;
        assert_eq!(used(&s).await, 0, "unlinking the last link frees at once");
        write(&s, fh, 400, &[2u8; 500]).await;
        assert_eq!(used(&s).await, 0, "a file no scan can find is not counted");
        let e = err_data(&s, Request::Write { fh, offset: 900 }, Bytes::from(vec![3u8; 101])).await;
        assert_eq!(e, ErrorCode::QuotaExceeded, "but it may not grow past what the quota has free");
        ok(&s, Request::Close { fh }).await;
        assert_eq!(scan_usage(&f.home("alice")).expect("scan"), 0);
    }

    #[tokio::test]
    async fn copy_range_is_quota_checked() {
        let f = Fixture::new();
        let s = f.session("alice", 1500).await;
        put(&s, "src", &[7u8; 1000]).await;
        let src = open(&s, "src", OpenFlags { read: true, ..OpenFlags::default() }).await;
        let dst = open(&s, "dst", rw_create()).await;
        let e = err(&s, Request::CopyRange { src, src_offset: 0, dst, dst_offset: 0, len: 1000 }).await;
        assert_eq!(e, ErrorCode::QuotaExceeded);
        assert_eq!(stat(&s, "dst").await.size, 0, "nothing copied");
        assert_eq!(
            ok(&s, Request::CopyRange { src, src_offset: 0, dst, dst_offset: 0, len: 500 }).await,
            Response::Copied { len: 500 }
        );
        assert_eq!(used(&s).await, 1500);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_of_one_user_never_overshoot() {
        const LIMIT: u64 = (1 << 20) + 12_345;
        const CHUNK: usize = 10_000;
        let f = Arc::new(Fixture::new());
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = f.session("alice", LIMIT).await;
            tasks.push(tokio::spawn(async move {
                let own = open(&s, &format!("w{i}"), rw_create()).await;
                let shared = open(&s, "shared", OpenFlags { append: true, ..rw_create() }).await;
                let mut written = 0u64;
                for n in 0u64.. {
                    let (fh, offset) = if n % 2 == 0 { (own, n / 2 * CHUNK as u64) } else { (shared, 0) };
                    match s.handle(Request::Write { fh, offset }, Bytes::from(vec![i as u8; CHUNK])).await {
                        Ok(_) => written += CHUNK as u64,
                        Err(e) if e.code == ErrorCode::QuotaExceeded => break,
                        Err(e) => panic!("writer {i}: {e}"),
                    }
                }
                s.end().await;
                written
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("writer task");
        }
        let s = f.session("alice", LIMIT).await;
        let scanned = scan_usage(&f.home("alice")).expect("scan");
        assert!(total <= LIMIT, "writers wrote {total} bytes past a limit of {LIMIT}");
        assert_eq!(total, scanned, "every accepted byte is on disk");
        assert_eq!(used(&s).await, scanned, "the ledger equals a fresh scan");
        assert!(LIMIT - total < CHUNK as u64, "writers stopped only when a chunk no longer fit");
    }

    /// Root only: a 4 MiB tmpfs as the storage root, filled through fsd with a quota far above
    /// it. The write that no longer fits fails with ENOSPC and leaves no partial growth, the
    /// ledger equals a fresh scan, earlier files are intact, and deleting makes room again.
    #[tokio::test]
    async fn a_full_disk_gives_nospace_and_corrupts_nothing() {
        let Some(f) = Fixture::on_tmpfs("4m") else { return };
        assert!(f.tmpfs.is_some());
        let log = LogCapture::default();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(log.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .finish(),
        );
        let s = f.session("alice", 1 << 30).await;
        let first: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        put(&s, "first", &first).await;
        let fh = open(&s, "fill", rw_create()).await;
        const CHUNK: usize = 300_000;
        let mut size = 0u64;
        let code = loop {
            match s.handle(Request::Write { fh, offset: size }, Bytes::from(vec![9u8; CHUNK])).await {
                Ok(_) => size += CHUNK as u64,
                Err(e) => break e.code,
            }
            assert!(size < 8 << 20, "wrote {size} bytes to a 4 MiB file system without an error");
        };
        assert_eq!(code, ErrorCode::NoSpace, "a write past the end of the disk");
        let logged = log.text();
        assert!(logged.contains("WARN") && logged.contains("request failed") && logged.contains("NoSpace"), "{logged}");
        assert!(size >= 2 << 20, "the disk filled after only {size} bytes");
        assert_eq!(stat(&s, "fill").await.size, size, "the failed write left no partial growth");
        assert_eq!(used(&s).await, first.len() as u64 + size, "the ledger counts what is on disk");
        assert_eq!(scan_usage(&f.home("alice")).expect("scan"), used(&s).await, "the ledger equals a fresh scan");
        let on_disk = std::fs::read(f.home("alice").join("first")).expect("first");
        assert_eq!(blake3::hash(&on_disk), blake3::hash(&first), "an earlier file is intact");
        let filled = std::fs::read(f.home("alice").join("fill")).expect("fill");
        assert!(
            filled.len() as u64 == size && filled.iter().all(|&b| b == 9),
            "the filled file holds what was acknowledged"
        );
        ok(&s, Request::Close { fh }).await;
        ok(&s, Request::Unlink { path: p("fill") }).await;
        assert_eq!(used(&s).await, first.len() as u64, "deleting frees at once");
        put(&s, "again", &vec![1u8; 2 << 20]).await;
        assert_eq!(scan_usage(&f.home("alice")).expect("scan"), used(&s).await);
        drop(s);
    }
}

mod locks {
    use super::*;

    fn range(kind: LockKind, start: u64, end: u64) -> LockSpec {
        LockSpec { kind, start, end, owner: 1, pid: 42, flock: false }
    }

    fn flock(kind: LockKind) -> LockSpec {
        LockSpec { kind, start: 0, end: u64::MAX, owner: 1, pid: 42, flock: true }
    }

    #[tokio::test]
    async fn two_sessions_see_each_others_locks() {
        let f = Fixture::new();
        let a = f.session("alice", 1 << 20).await;
        let b = f.session("alice", 1 << 20).await;
        put(&a, "db", b"data").await;
        let fa = open(&a, "db", rw_create()).await;
        let fb = open(&b, "db", rw_create()).await;
        ok(&a, Request::Lock { fh: fa, lock: range(LockKind::Read, 0, 99), wait: false }).await;
        ok(&b, Request::Lock { fh: fb, lock: range(LockKind::Read, 50, 60), wait: false }).await;
        let e = err(&b, Request::Lock { fh: fb, lock: range(LockKind::Write, 0, 0), wait: false }).await;
        assert_eq!(e, ErrorCode::WouldBlock);
        let Response::LockTest(Some(c)) =
            ok(&b, Request::TestLock { fh: fb, lock: range(LockKind::Write, 0, 0) }).await
        else {
            panic!("a conflict")
        };
        assert_eq!((c.kind, c.start, c.end, c.pid), (LockKind::Read, 0, 99, 42));

        // A waiter in session b is woken when a unlocks.
        ok(&b, Request::Lock { fh: fb, lock: range(LockKind::Unlock, 0, u64::MAX), wait: false }).await;
        let b = Arc::new(b);
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                b.handle(Request::Lock { fh: fb, lock: range(LockKind::Write, 0, 9), wait: true }, Bytes::new()).await
            })
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while f.locks.waiting() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for the lock request to wait");
            tokio::task::yield_now().await;
        }
        ok(&a, Request::Lock { fh: fa, lock: range(LockKind::Unlock, 0, u64::MAX), wait: false }).await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken in time");
        assert_eq!(got.expect("task").expect("granted").0, Response::Done);
        assert_eq!(
            err(&a, Request::Lock { fh: fa, lock: range(LockKind::Read, 5, 5), wait: false }).await,
            ErrorCode::WouldBlock
        );
        b.end().await;
        ok(&a, Request::Lock { fh: fa, lock: range(LockKind::Write, 0, u64::MAX), wait: false }).await;
    }

    #[tokio::test]
    async fn flock_holds_across_sessions_until_close_or_end() {
        let f = Fixture::new();
        let a = f.session("alice", 1 << 20).await;
        let b = f.session("alice", 1 << 20).await;
        put(&a, "f", b"").await;
        let fa = open(&a, "f", rw_create()).await;
        let fb = open(&b, "f", rw_create()).await;
        ok(&a, Request::Lock { fh: fa, lock: flock(LockKind::Write), wait: false }).await;
        assert_eq!(
            err(&b, Request::Lock { fh: fb, lock: flock(LockKind::Read), wait: false }).await,
            ErrorCode::WouldBlock
        );
        // fcntl locks are a separate family, as on Linux.
        ok(&b, Request::Lock { fh: fb, lock: range(LockKind::Write, 0, 10), wait: false }).await;
        ok(&a, Request::Close { fh: fa }).await;
        ok(&b, Request::Lock { fh: fb, lock: flock(LockKind::Write), wait: false }).await;
        let fa = open(&a, "f", rw_create()).await;
        assert_eq!(
            err(&a, Request::Lock { fh: fa, lock: flock(LockKind::Read), wait: false }).await,
            ErrorCode::WouldBlock
        );
        b.end().await;
        ok(&a, Request::Lock { fh: fa, lock: flock(LockKind::Read), wait: false }).await;
        ok(&a, Request::Lock { fh: fa, lock: range(LockKind::Write, 0, 10), wait: false }).await;
    }
}

/// Short requests run inline on a multi-thread runtime (ops/inline.rs) when a slot is free, on
/// the pool otherwise: both ways at once must give the same results and an exact quota.
mod inline {
    use super::*;

    /// Four sessions of one user, on four runtime threads, each making, linking, renaming over
    /// and removing files in one shared directory: every request answers as it would alone, and
    /// the ledger equals a fresh scan afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn short_requests_of_many_sessions_keep_the_quota_exact() {
        let f = Arc::new(Fixture::new());
        let s = f.session("alice", 1 << 30).await;
        ok(&s, Request::Mkdir { path: p("d"), mode: 0o755 }).await;
        let mut tasks = Vec::new();
        for i in 0..4u8 {
            let s = f.session("alice", 1 << 30).await;
            tasks.push(tokio::spawn(async move {
                for n in 0..50u32 {
                    let (a, b, c) = (format!("d/{i}-{n}-a"), format!("d/{i}-{n}-b"), format!("d/{i}-{n}-c"));
                    let put = Request::PutFile { path: p(&a), mode: 0o600, mtime: None, exclusive: true };
                    ok_data(&s, put, Bytes::from(vec![i; 100 + n as usize])).await;
                    ok(&s, Request::Link { from: p(&a), to: p(&b) }).await;
                    // Not the last link: frees nothing.
                    ok(&s, Request::Unlink { path: p(&a) }).await;
                    ok(&s, Request::Symlink { target: a.clone().into_bytes(), path: p(&a) }).await;
                    ok(&s, Request::Rename { from: p(&b), to: p(&c), flags: RenameFlags::default() }).await;
                    if n % 2 == 0 {
                        ok(&s, Request::Unlink { path: p(&c) }).await;
                    }
                    let dir = format!("d/{i}-{n}-dir");
                    ok(&s, Request::Mkdir { path: p(&dir), mode: 0o700 }).await;
                    ok(&s, Request::Rmdir { path: p(&dir) }).await;
                    assert_eq!(err(&s, Request::Unlink { path: p(&dir) }).await, ErrorCode::NotFound);
                }
                s.end().await;
            }));
        }
        for t in tasks {
            t.await.expect("session task");
        }
        let scanned = scan_usage(&f.home("alice")).expect("scan");
        // Per session: 25 files kept (odd n) of 100 + n bytes, and 50 symlinks to their first name.
        let files: u64 = (0..50u64).filter(|n| n % 2 == 1).map(|n| 100 + n).sum::<u64>() * 4;
        let links: u64 = (0..4).flat_map(|i| (0..50).map(move |n| format!("d/{i}-{n}-a").len() as u64)).sum();
        assert_eq!(scanned, files + links, "the kept files and the symlinks");
        assert_eq!(used(&s).await, scanned, "the ledger equals a fresh scan");
    }
}
