//! Jail scenarios: every way out of the home is refused or stays inside, and the file outside is
//! untouched; two users never see each other's files; a server switched to `nobody` enforces
//! file modes.

use bytes::Bytes;
use homefs_mount::client::Client;
use homefs_shared::{ErrorCode, OpenFlags, RenameFlags};
use homefs_tests::{hash, wp, TestServer};
use std::path::PathBuf;

const SECRET: &[u8] = b"outside the home: never readable or writable through fsd\n";

/// A server with user alice and a file beside the homes, outside any jail.
fn setup(name: &str) -> (TestServer, PathBuf) {
    let server = TestServer::start(name);
    server.add_user("alice", "pw", None);
    let outside = server.dir.join("outside.txt");
    std::fs::write(&outside, SECRET).expect("write the outside file");
    (server, outside)
}

fn assert_untouched(outside: &PathBuf) {
    assert_eq!(std::fs::read(outside).expect("outside file still there"), SECRET, "the outside file changed");
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(std::fs::metadata(outside).expect("stat").nlink(), 1, "the outside file gained a link");
}

/// Tries to read `path` through the client; returns the bytes if that worked.
async fn try_read(c: &Client, path: &[u8]) -> Option<Vec<u8>> {
    let (fh, _) = c.open(&wp(path), OpenFlags { read: true, ..Default::default() }, 0).await.ok()?;
    let data = c.read(fh, 0, 1 << 20).await.ok().map(|(d, _)| d.to_vec());
    let _ = c.close(fh).await;
    data
}

/// Tries to overwrite `path` through the client.
async fn try_clobber(c: &Client, path: &[u8]) {
    let flags = OpenFlags { write: true, create: true, truncate: true, ..Default::default() };
    if let Ok((fh, _)) = c.open(&wp(path), flags, 0o644).await {
        let _ = c.write(fh, 0, Bytes::from_static(b"pwned")).await;
        let _ = c.close(fh).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotdot_and_absolute_paths_stay_inside() {
    let (server, outside) = setup("dotdot_and_absolute_paths_stay_inside");
    server.add_user("bob", "pw", None);
    let c = server.connect("alice", "pw").await;
    let bob = server.connect("bob", "pw").await;
    bob.stat(&wp(".")).await.expect("bob's home exists");
    let abs = outside.as_os_str().as_encoded_bytes().to_vec();
    let escapes: Vec<Vec<u8>> = vec![
        b"../outside.txt".to_vec(),
        b"../../outside.txt".to_vec(),
        b"x/../../../outside.txt".to_vec(),
        abs.clone(),
    ];
    for p in &escapes {
        assert_ne!(try_read(&c, p).await.as_deref(), Some(SECRET), "read {:?} escaped", String::from_utf8_lossy(p));
        if let Ok(a) = c.stat(&wp(p)).await {
            assert_ne!(a.size, SECRET.len() as u64, "stat {:?} saw the outside file", String::from_utf8_lossy(p));
        }
        try_clobber(&c, p).await;
        let _ = c.unlink(&wp(p)).await;
        let _ = c.rename(&wp(p), &wp("stolen"), RenameFlags::default()).await;
        let _ = c.link(&wp(p), &wp("hardlinked")).await;
        assert_untouched(&outside);
    }
    // `..` of the home is the home: it never lists the other homes.
    for p in ["..", "../..", "/"] {
        if let Ok(entries) = c.read_dir(&wp(p)).await {
            assert!(!entries.iter().any(|e| e.name == b"bob" || e.name == b"outside.txt"), "listing {p} escaped");
        }
    }
    assert_ne!(
        try_read(&c, b"/etc/passwd").await.map(|d| hash(&d)),
        std::fs::read("/etc/passwd").ok().map(|d| hash(&d))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_made_by_the_user_stay_inside() {
    let (server, outside) = setup("symlinks_made_by_the_user_stay_inside");
    let c = server.connect("alice", "pw").await;
    let abs = outside.as_os_str().as_encoded_bytes().to_vec();
    let dir_abs = server.dir.as_os_str().as_encoded_bytes().to_vec();
    c.symlink(&abs, &wp("abs")).await.expect("symlink to an absolute path (stored as given)");
    c.symlink(b"../../outside.txt", &wp("rel")).await.expect("symlink with ..");
    c.symlink(&dir_abs, &wp("outdir")).await.expect("symlink to the outside directory");
    c.symlink(b"/", &wp("root")).await.expect("symlink to /");
    assert_eq!(c.readlink(&wp("abs")).await.expect("readlink"), abs);

    for link in [&b"abs"[..], b"rel", b"outdir/outside.txt"] {
        assert_ne!(
            try_read(&c, link).await.as_deref(),
            Some(SECRET),
            "read through {:?}",
            String::from_utf8_lossy(link)
        );
        if let Ok((h, ..)) = c.checksum(&wp(link), 0, u64::MAX).await {
            assert_ne!(h, hash(SECRET), "checksum through {:?}", String::from_utf8_lossy(link));
        }
        try_clobber(&c, link).await;
        let _ = c.setattr(&wp(link), None, homefs_shared::SetAttr { size: Some(0), ..Default::default() }).await;
        assert_untouched(&outside);
    }
    let _ = c.mkdir(&wp("outdir/made-by-alice"), 0o755).await;
    assert!(!server.dir.join("made-by-alice").exists(), "mkdir beneath a symlink escaped");
    if let Ok(entries) = c.read_dir(&wp("root")).await {
        assert!(
            !entries.iter().any(|e| e.name == b"proc" || e.name == b"etc"),
            "the symlink to / listed the real root"
        );
    }
    // A hard link to the outside file through a symlink: refused, or made of something inside.
    let _ = c.link(&wp("outdir/outside.txt"), &wp("hl")).await;
    let _ = c.link(&wp("abs"), &wp("hl2")).await;
    assert_ne!(try_read(&c, b"hl").await.as_deref(), Some(SECRET));
    assert_ne!(try_read(&c, b"hl2").await.as_deref(), Some(SECRET));
    assert_untouched(&outside);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_never_see_each_other() {
    let server = TestServer::start("two_users_never_see_each_other");
    server.add_user("alice", "pw-a", None);
    server.add_user("bob", "pw-b", None);
    let (a, b) = tokio::join!(server.connect("alice", "pw-a"), server.connect("bob", "pw-b"));
    let flags = OpenFlags { write: true, create: true, ..Default::default() };
    let (fh, _) = a.open(&wp("diary"), flags, 0o600).await.expect("create");
    a.write(fh, 0, Bytes::from_static(b"alice's secret")).await.expect("write");
    a.close(fh).await.expect("close");
    let (fh, _) = b.open(&wp("notes"), flags, 0o600).await.expect("create");
    b.write(fh, 0, Bytes::from_static(b"bob's")).await.expect("write");
    b.close(fh).await.expect("close");

    let names = |v: Vec<homefs_shared::DirEntry>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(names(a.read_dir(&wp(".")).await.expect("ls")), vec![b"diary".to_vec()]);
    assert_eq!(names(b.read_dir(&wp(".")).await.expect("ls")), vec![b"notes".to_vec()]);
    for p in [&b"diary"[..], b"../alice/diary", b"/alice/diary", b"/../alice/diary"] {
        assert_eq!(try_read(&b, p).await, None, "bob read {:?}", String::from_utf8_lossy(p));
    }
    assert_eq!(b.stat(&wp("diary")).await.expect_err("not bob's").code, ErrorCode::NotFound);
    assert_eq!(std::fs::read(server.home_path("alice").join("diary")).expect("on disk"), b"alice's secret");
    assert!(!server.home_path("bob").join("diary").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_are_enforced_after_dropping_root() {
    let Some(server) = TestServer::start_as_nobody("modes_are_enforced_after_dropping_root") else { return };
    server.add_user("alice", "pw", None);
    let c = server.connect("alice", "pw").await;
    let (fh, _) = c
        .open(&wp("locked"), OpenFlags { write: true, create: true, ..Default::default() }, 0o644)
        .await
        .expect("create");
    c.write(fh, 0, Bytes::from_static(b"data")).await.expect("write");
    c.close(fh).await.expect("close");
    c.setattr(&wp("locked"), None, homefs_shared::SetAttr { mode: Some(0), ..Default::default() })
        .await
        .expect("chmod 000");
    let e = c.open(&wp("locked"), OpenFlags { read: true, ..Default::default() }, 0).await.expect_err("mode 000 read");
    assert_eq!(e.code, ErrorCode::Access);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid().expect("running"))).expect("status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line").to_string();
    assert!(!uid.split_whitespace().skip(1).any(|u| u == "0"), "fsd still has uid 0: {uid}");
}
