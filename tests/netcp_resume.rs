//! netcp resume against a real fsd: a put and a get killed part-way continue where they stopped
//! (only the rest crosses the wire), a corrupted partial file is detected and copied again, and a
//! source that changed starts from zero.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use homefs_tests::netcp::{
    bytes_sent, hash_file, partial_files, resumed_at, server_with_user, wait_for_partial, wait_output, write_random,
    Netcp, PACED_BYTES,
};
use homefs_tests::server::TestServer;

const PASSWORD: &str = "correct horse";
const SIZE: u64 = 256 << 20;
// Killed runs (`Netcp::spawn`) are paced so that they are still going when the test acts.
const _: () = assert!(SIZE >= PACED_BYTES);
/// How far the first run gets before it is killed.
const KILL_AFTER: u64 = 40 << 20;
/// A put may lose up to 8 chunks in flight (see copy/resume.rs).
const IN_FLIGHT_BYTES: u64 = 8 * CHUNK;
/// netcp's request size.
const CHUNK: u64 = 4 << 20;

fn server_with_alice(name: &str) -> (TestServer, Netcp) {
    server_with_user(name, "alice", PASSWORD, None)
}

fn kill(mut child: std::process::Child) {
    child.kill().expect("kill netcp");
    child.wait().expect("reap netcp");
}

#[test]
fn netcp_put_killed_part_way_resumes() {
    let (server, netcp) = server_with_alice("netcp_put_killed_part_way_resumes");
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    write_random(&big, SIZE, 11);
    let home = server.home_path("alice");
    let args = [big.as_os_str().to_owned(), netcp.remote("big")];

    let mut child = netcp.spawn(&args);
    let part = wait_for_partial(&home, KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);
    let had = std::fs::metadata(&part).expect("partial file kept").len();
    assert!(had < SIZE, "the put finished before it was killed");

    let run = netcp.run(&args).ok();
    eprintln!("server had {had} bytes; {}", run.stdout.trim());
    let at = resumed_at(&run.stdout).unwrap_or_else(|| panic!("did not resume: {}", run.stdout));
    let sent = bytes_sent(&run.stdout).expect("bytes sent");
    // The server may still finish writes that were in flight when netcp was killed, and a put
    // resumes at most IN_FLIGHT chunks before the end of the partial file (see copy/resume.rs).
    assert!(at.abs_diff(had) <= IN_FLIGHT_BYTES + CHUNK, "resumed at {at}, server had {had}");
    assert!(at > 0 && at + sent == SIZE, "resumed at {at}, sent {sent}");
    assert_eq!(hash_file(&home.join("big")), hash_file(&big));
    assert!(partial_files(&home).is_empty(), "partial file left behind");
}

#[test]
fn netcp_tree_put_killed_part_way_resumes_the_large_file_and_batches_the_rest() {
    let (server, netcp) =
        server_with_alice("netcp_tree_put_killed_part_way_resumes_the_large_file_and_batches_the_rest");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("small")).expect("mkdir");
    write_random(&tree.join("big"), SIZE, 13);
    for i in 0..150 {
        write_random(&tree.join(format!("small/f{i}")), 1000 + i * 10, 100 + i);
    }
    let on_server = server.home_path("alice").join("tree");
    let args = ["-r".into(), "-j".into(), "4".into(), tree.as_os_str().to_owned(), netcp.remote("")];

    let mut child = netcp.spawn(&args);
    let part = wait_for_partial(&on_server, KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);
    let had = std::fs::metadata(&part).expect("partial file kept").len();
    assert!(had < SIZE, "the put finished before it was killed");

    let mut again = netcp.command();
    again.env("NETCP_LOG", "netcp=debug").args(&args);
    let run = homefs_tests::netcp::run_bounded(again, Duration::from_secs(300)).ok();
    let at = resumed_at(&run.stdout).unwrap_or_else(|| panic!("did not resume: {}", run.stdout));
    assert!(at > 0 && at.abs_diff(had) <= IN_FLIGHT_BYTES + CHUNK, "resumed at {at}, server had {had}");
    let sent = run.stderr.lines().find(|l| l.contains("requests sent")).expect("request counts");
    assert!(sent.contains("(\"put_files\", 3)") && !sent.contains("(\"put_file\""), "small files batched: {sent}");
    assert_eq!(hash_file(&on_server.join("big")), hash_file(&tree.join("big")));
    for i in 0..150 {
        let rel = format!("small/f{i}");
        assert_eq!(hash_file(&on_server.join(&rel)), hash_file(&tree.join(&rel)), "{rel}");
    }
    assert!(partial_files(&on_server).is_empty() && partial_files(&on_server.join("small")).is_empty());
}

#[test]
fn netcp_get_killed_part_way_resumes_and_detects_corruption() {
    let (server, netcp) = server_with_alice("netcp_get_killed_part_way_resumes_and_detects_corruption");
    let home = server.home_path("alice");
    write_random(&home.join("big"), SIZE, 12);
    let expected = hash_file(&home.join("big"));
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("big");
    let args = [netcp.remote("big"), out.as_os_str().to_owned()];

    // Killed, then resumed: only the rest crosses the wire.
    let mut child = netcp.spawn(&args);
    let part = wait_for_partial(work.path(), KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);
    let had = std::fs::metadata(&part).expect("partial file kept").len();
    let run = netcp.run(&args).ok();
    eprintln!("partial file had {had} bytes; {}", run.stdout.trim());
    assert_eq!(resumed_at(&run.stdout), Some(had), "{}", run.stdout);
    assert_eq!(bytes_sent(&run.stdout), Some(SIZE - had), "{}", run.stdout);
    assert_eq!(hash_file(&out), expected);
    assert!(partial_files(work.path()).is_empty());

    // Killed again, then the partial file's prefix is corrupted: detected, copied from zero.
    std::fs::remove_file(&out).expect("rm");
    let mut child = netcp.spawn(&args);
    let part = wait_for_partial(work.path(), KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);
    let mut f = std::fs::OpenOptions::new().write(true).open(&part).expect("open partial");
    f.seek(SeekFrom::Start(1000)).expect("seek");
    f.write_all(b"garbage").expect("corrupt");
    drop(f);
    let run = netcp.run(&args).ok();
    assert_eq!(resumed_at(&run.stdout), None, "resumed from a corrupted prefix: {}", run.stdout);
    assert_eq!(hash_file(&out), expected);
}

#[test]
fn netcp_changed_source_starts_from_zero() {
    let (server, netcp) = server_with_alice("netcp_changed_source_starts_from_zero");
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    write_random(&big, SIZE, 13);
    let home = server.home_path("alice");
    let args = [big.as_os_str().to_owned(), netcp.remote("big")];
    let mut child = netcp.spawn(&args);
    wait_for_partial(&home, KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);

    // The source grows meanwhile: the old partial file must not be continued.
    std::fs::OpenOptions::new().append(true).open(&big).expect("open").write_all(b"more").expect("append");
    let run = netcp.run(&args).ok();
    assert_eq!(resumed_at(&run.stdout), None, "{}", run.stdout);
    assert_eq!(hash_file(&home.join("big")), hash_file(&big));
    assert!(partial_files(&home).is_empty(), "stale partial file left: {:?}", partial_files(&home));

    // --no-resume copies everything even with a good partial file present.
    let mut child = netcp.spawn(&args);
    wait_for_partial(&home, KILL_AFTER, &mut child, Duration::from_secs(120));
    kill(child);
    let mut no_resume = vec![std::ffi::OsString::from("--no-resume")];
    no_resume.extend(args.iter().cloned());
    let run = netcp.run(&no_resume).ok();
    assert_eq!(resumed_at(&run.stdout), None, "{}", run.stdout);
    assert_eq!(hash_file(&home.join("big")), hash_file(&big));
}

#[test]
fn netcp_put_continues_across_a_server_restart() {
    let (mut server, netcp) = server_with_alice("netcp_put_continues_across_a_server_restart");
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    write_random(&big, SIZE, 14);
    let home = server.home_path("alice");
    let mut child = netcp.spawn_captured([big.as_os_str().to_owned(), netcp.remote("big")]);
    wait_for_partial(&home, KILL_AFTER, &mut child, Duration::from_secs(120));
    server.restart();
    // The restart fell in the middle of the put (the spawn is paced to last seconds).
    assert!(child.try_wait().expect("wait").is_none(), "the put ended before the server was back");
    let run = wait_output(child, Duration::from_secs(300)).ok();
    eprintln!("{}", run.stdout.trim());
    // Either the client's reconnect carried the open transfer over (the session token and the
    // handle come back), or netcp resumed from the verified prefix: both end verified.
    if let Some(at) = resumed_at(&run.stdout) {
        assert!(at > 0 && at < SIZE, "resumed at {at}");
    }
    assert!(run.stdout.contains("verified"), "{}", run.stdout);
    assert_eq!(hash_file(&home.join("big")), hash_file(&big));
}

/// `--bwlimit` holds a put and a get to the rate (after one second's burst), also a tree's small
/// files; a bad RATE is a usage error.
#[test]
fn netcp_bwlimit_paces_transfers() {
    let (_server, netcp) = server_with_alice("netcp_bwlimit_paces_transfers");
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    write_random(&big, 24 << 20, 15);
    // 24 MiB at 8 MiB/s: 8 MiB of burst, then 16 MiB take at least 2 s.
    let t0 = Instant::now();
    netcp.run(["--bwlimit".as_ref(), "8M".as_ref(), big.as_os_str(), &netcp.remote("big")]).ok();
    assert!(t0.elapsed() >= Duration::from_millis(1_950), "put took only {:?}", t0.elapsed());
    let back = work.path().join("back");
    let t0 = Instant::now();
    netcp.run(["--bwlimit".as_ref(), "8192".as_ref(), netcp.remote("big").as_os_str(), back.as_os_str()]).ok();
    assert!(t0.elapsed() >= Duration::from_millis(1_950), "get took only {:?}", t0.elapsed());
    assert_eq!(hash_file(&back), hash_file(&big));

    // 40 files of 256 KiB (one request each) at 2 MiB/s: 2 MiB of burst, 8 MiB take 4 s.
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    for i in 0..40 {
        write_random(&tree.join(format!("f{i}")), 256 << 10, 100 + i);
    }
    let t0 = Instant::now();
    netcp
        .run(
            ["-r", "-j", "4", "--bwlimit", "2M"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain([tree.as_os_str(), &netcp.remote("")]),
        )
        .ok();
    assert!(t0.elapsed() >= Duration::from_millis(3_900), "tree put took only {:?}", t0.elapsed());

    let bad = netcp.run(["--bwlimit".as_ref(), "fast".as_ref(), big.as_os_str(), &netcp.remote("x")]);
    assert_eq!(bad.code, Some(2), "a bad rate is a usage error: {}", bad.stderr);
    assert!(bad.stderr.contains("fast"), "{}", bad.stderr);
}
