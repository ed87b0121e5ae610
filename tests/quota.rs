//! Quota scenarios: exactly at the limit, one byte over, truncate-up, a sparse write far past
//! the end, delete then write again, concurrent writers of one user on several connections, and
//! `fsd user list`. The server runs as `nobody` when the tests run as root, as in production:
//! root's privileges must not bypass anything.

use bytes::Bytes;
use homefs_mount::client::Client;
use homefs_shared::{ErrorCode, OpenFlags, SetAttr};
use homefs_tests::{wp, TestServer};

const QUOTA: u64 = 1 << 20; // "1M"

fn start(name: &str) -> TestServer {
    let server = match homefs_tests::is_root() {
        true => TestServer::start_as_nobody(name).expect("root can switch to nobody"),
        false => TestServer::start(name),
    };
    server.add_user("carol", "pw", Some("1M"));
    server
}

fn create() -> OpenFlags {
    OpenFlags { read: true, write: true, create: true, ..Default::default() }
}

async fn used(c: &Client) -> u64 {
    c.statfs().await.expect("statfs").used_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_and_one_byte_over() {
    let server = start("at_the_limit_and_one_byte_over");
    let c = server.connect("carol", "pw").await;
    assert_eq!(c.statfs().await.expect("statfs").total_bytes, QUOTA, "df size is the quota");

    // One byte over in one write: refused, nothing written.
    let (fh, _) = c.open(&wp("big"), create(), 0o644).await.expect("create");
    let e = c.write(fh, 0, Bytes::from(vec![1u8; QUOTA as usize + 1])).await.expect_err("over quota");
    assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e}");
    assert_eq!(c.stat(&wp("big")).await.expect("stat").size, 0, "nothing written");
    assert_eq!(used(&c).await, 0);

    // Exactly at the limit: fine; then one more byte is not.
    c.write(fh, 0, Bytes::from(vec![2u8; QUOTA as usize])).await.expect("exactly the quota");
    assert_eq!((used(&c).await, c.statfs().await.expect("statfs").free_bytes), (QUOTA, 0));
    let e = c.write(fh, QUOTA, Bytes::from_static(b"x")).await.expect_err("one byte over");
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    let (fh2, _) = c.open(&wp("other"), create(), 0o644).await.expect("an empty file still fits");
    assert_eq!(c.write(fh2, 0, Bytes::from_static(b"y")).await.expect_err("full").code, ErrorCode::QuotaExceeded);
    // Overwriting in place needs no new space.
    c.write(fh, 10, Bytes::from_static(b"zzz")).await.expect("overwrite in place");
    assert_eq!(c.stat(&wp("big")).await.expect("stat").size, QUOTA);

    // Delete, then the space is free again at once.
    c.close(fh).await.expect("close");
    c.unlink(&wp("big")).await.expect("unlink");
    assert_eq!(used(&c).await, 0);
    c.write(fh2, 0, Bytes::from(vec![3u8; QUOTA as usize])).await.expect("write again after delete");
    c.close(fh2).await.expect("close");
    assert_eq!(std::fs::metadata(server.home_path("carol").join("other")).expect("on disk").len(), QUOTA);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_up_and_sparse_writes_count() {
    let server = start("truncate_up_and_sparse_writes_count");
    let c = server.connect("carol", "pw").await;
    let (fh, _) = c.open(&wp("sparse"), create(), 0o644).await.expect("create");
    let up = |size| SetAttr { size: Some(size), ..Default::default() };
    let e = c.setattr(&wp("sparse"), Some(fh), up(QUOTA + 1)).await.expect_err("truncate past the quota");
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    c.setattr(&wp("sparse"), None, up(QUOTA / 2)).await.expect("truncate up within the quota");
    assert_eq!(used(&c).await, QUOTA / 2, "apparent size counts");
    // A byte far past the end: the hole counts too.
    let e = c.write(fh, 10 * QUOTA, Bytes::from_static(b"x")).await.expect_err("sparse far past the end");
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    assert_eq!(c.stat(&wp("sparse")).await.expect("stat").size, QUOTA / 2, "nothing written");
    c.write(fh, QUOTA - 1, Bytes::from_static(b"x")).await.expect("sparse write up to the limit");
    assert_eq!(used(&c).await, QUOTA);
    c.setattr(&wp("sparse"), Some(fh), up(10)).await.expect("truncate down");
    assert_eq!(used(&c).await, 10, "truncating frees at once");
    c.close(fh).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_overshoot() {
    let server = start("concurrent_writers_never_overshoot");
    let mut tasks = Vec::new();
    for i in 0..4 {
        let c = server.connect("carol", "pw").await;
        tasks.push(tokio::spawn(async move {
            let path = wp(format!("w{i}"));
            let (fh, _) = c.open(&path, create(), 0o644).await.expect("create");
            let mut offset = 0u64;
            loop {
                match c.write(fh, offset, Bytes::from(vec![i as u8; 48 << 10])).await {
                    Ok(_) => offset += 48 << 10,
                    Err(e) if e.code == ErrorCode::QuotaExceeded => break,
                    Err(e) => panic!("writer {i}: {e}"),
                }
            }
            c.close(fh).await.expect("close");
            offset
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.expect("writer task");
    }
    assert!(written <= QUOTA, "writers together wrote {written} bytes over a quota of {QUOTA}");
    assert!(written > QUOTA - 4 * (48 << 10), "writers stopped early: {written}");
    let c = server.connect("carol", "pw").await;
    assert_eq!(used(&c).await, written, "the ledger matches what was written");
    let on_disk: u64 =
        (0..4).map(|i| std::fs::metadata(server.home_path("carol").join(format!("w{i}"))).expect("file").len()).sum();
    assert_eq!(on_disk, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_list_shows_usage() {
    let server = start("user_list_shows_usage");
    server.add_user("dave", "pw", Some("2G"));
    let c = server.connect("carol", "pw").await;
    let (fh, _) = c.open(&wp("half"), create(), 0o644).await.expect("create");
    c.write(fh, 0, Bytes::from(vec![0u8; QUOTA as usize / 2])).await.expect("write");
    c.close(fh).await.expect("close");
    let list = server.user_list();
    let line = |name: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{list}"))
    };
    let carol = line("carol");
    assert!(carol.contains("50"), "carol uses 50% of her quota: {carol:?}");
    assert!(carol.contains("524288"), "carol uses 512 KiB: {carol:?}");
    let dave = line("dave");
    assert!(dave.contains("2G") || dave.contains("2.0G") || dave.contains("2 G"), "dave's quota: {dave:?}");
}
