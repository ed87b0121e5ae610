//! netcp copies against a real fsd through the real binary: files of every shape, many at once,
//! trees with symlinks, small files in batches (one refused file failing alone), the quota refused
//! before sending, a symlink out of the home, and progress shown as bars on a terminal and as
//! summary lines in a pipe.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use homefs_tests::netcp::{hash_file, partial_files, run_bounded, server_with_user, write_random, Netcp};
use homefs_tests::server::TestServer;

const PASSWORD: &str = "correct horse";

fn server_with_alice(name: &str, quota: Option<&str>) -> (TestServer, Netcp) {
    server_with_user(name, "alice", PASSWORD, quota)
}

#[test]
fn netcp_put_get_empty_small_and_non_utf8() {
    let (server, netcp) = server_with_alice("netcp_put_get_empty_small_and_non_utf8", None);
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let empty = src.join("empty");
    std::fs::write(&empty, b"").expect("write");
    let small = src.join("small.bin");
    write_random(&small, 100 * 1024 + 3, 1);
    let odd = src.join(std::ffi::OsStr::from_bytes(b"caf\xe9-\x01.bin"));
    write_random(&odd, 5000, 2);

    let run = netcp.run([empty.as_os_str(), small.as_os_str(), odd.as_os_str(), netcp.remote("").as_os_str()]).ok();
    assert_eq!(run.stdout.lines().filter(|l| l.ends_with("verified")).count(), 3, "{}", run.stdout);
    let home = server.home_path("alice");
    for f in [&empty, &small, &odd] {
        let name = f.file_name().expect("name");
        assert_eq!(hash_file(&home.join(name)), hash_file(f), "{name:?} differs on the server");
    }
    assert!(partial_files(&home).is_empty());

    let back = work.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    let names: Vec<_> =
        [&empty, &small, &odd].iter().map(|f| netcp.remote(f.file_name().expect("name").as_bytes())).collect();
    let mut args: Vec<&std::ffi::OsStr> = names.iter().map(|n| n.as_os_str()).collect();
    args.push(back.as_os_str());
    netcp.run(args).ok();
    for f in [&empty, &small, &odd] {
        let name = f.file_name().expect("name");
        assert_eq!(hash_file(&back.join(name)), hash_file(f), "{name:?} differs after get");
    }
    assert!(partial_files(&back).is_empty());
}

#[test]
fn netcp_256_mib_both_ways() {
    let (server, netcp) = server_with_alice("netcp_256_mib_both_ways", None);
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    write_random(&big, 256 << 20, 3);
    let t = std::time::Instant::now();
    let run = netcp.run([big.as_os_str(), netcp.remote("big").as_os_str()]).ok();
    eprintln!("put 256 MiB: {:?} ({})", t.elapsed(), run.stdout.trim());
    assert_eq!(hash_file(&server.home_path("alice").join("big")), hash_file(&big));

    let back = work.path().join("back");
    let t = std::time::Instant::now();
    let run = netcp.run([netcp.remote("big").as_os_str(), back.as_os_str()]).ok();
    eprintln!("get 256 MiB: {:?} ({})", t.elapsed(), run.stdout.trim());
    assert_eq!(hash_file(&back), hash_file(&big));
}

fn tree_listing(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("below root").display().to_string();
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                out.push((rel, format!("-> {}", std::fs::read_link(&p).expect("readlink").display())));
            } else if meta.is_dir() {
                out.push((rel, "dir".into()));
                stack.push(p);
            } else {
                out.push((rel, hash_file(&p).to_hex().to_string()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn netcp_tree_with_nested_dirs_and_symlinks() {
    let (server, netcp) = server_with_alice("netcp_tree_with_nested_dirs_and_symlinks", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b/c")).expect("mkdir");
    std::fs::create_dir_all(tree.join("empty")).expect("mkdir");
    write_random(&tree.join("a/b/c/deep.bin"), 300_000, 4);
    write_random(&tree.join("a/one"), 10, 5);
    write_random(&tree.join("top"), 5 << 20, 6);
    std::fs::write(tree.join(std::ffi::OsStr::from_bytes(b"a/\xff\xfe")), b"odd").expect("write");
    std::os::unix::fs::symlink("a/b/c/deep.bin", tree.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", tree.join("a/abs-link")).expect("symlink");

    // "copy" exists, so the tree lands in copy/tree (as with cp and scp). A partial file left there
    // by an older version of a/one: the tree's sweep removes it.
    let on_server = server.home_path("alice").join("copy/tree");
    std::fs::create_dir_all(on_server.join("a")).expect("mkdir");
    std::fs::write(on_server.join("a/.one.0123456789abcdef.homefs-part"), b"stale").expect("write");
    let run = netcp
        .run([
            std::ffi::OsStr::new("-r"),
            "-j".as_ref(),
            "3".as_ref(),
            tree.as_os_str(),
            netcp.remote("copy").as_os_str(),
        ])
        .ok();
    assert!(run.stdout.contains("verified"), "{}", run.stdout);
    assert_eq!(tree_listing(&on_server), tree_listing(&tree));

    let back = work.path().join("back");
    netcp.run([std::ffi::OsStr::new("-r"), netcp.remote("copy/tree").as_os_str(), back.as_os_str()]).ok();
    assert_eq!(tree_listing(&back), tree_listing(&tree));
}

/// The `(kind, count)` pairs of the "requests sent" debug line, e.g. `("put_file", 30)`.
fn requests_sent(stderr: &str) -> String {
    let line =
        stderr.lines().find(|l| l.contains("requests sent")).unwrap_or_else(|| panic!("no request counts in {stderr}"));
    line.to_string()
}

#[test]
fn netcp_small_files_go_in_a_batch_and_one_sync() {
    let (server, netcp) = server_with_alice("netcp_small_files_go_in_a_batch_and_one_sync", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("many");
    for d in 0..3 {
        std::fs::create_dir_all(tree.join(format!("d{d}"))).expect("mkdir");
        for f in 0..10 {
            write_random(&tree.join(format!("d{d}/f{f}")), 4096 + f, d * 100 + f);
        }
    }
    // Too large for a batch, still one request; one byte more than 1 MiB: streamed.
    write_random(&tree.join("edge"), 1 << 20, 7);
    write_random(&tree.join("big"), (1 << 20) + 1, 8);
    let run = netcp
        .run_logged([
            std::ffi::OsStr::new("-r"),
            "-j".as_ref(),
            "4".as_ref(),
            tree.as_os_str(),
            netcp.remote("").as_os_str(),
        ])
        .ok();
    let sent = requests_sent(&run.stderr);
    assert!(sent.contains("(\"put_files\", 1)"), "30 small files in one PutFiles: {sent}");
    assert!(sent.contains("(\"put_file\", 1)"), "the 1 MiB file in one PutFile: {sent}");
    assert!(sent.contains("(\"sync\", 1)") && !sent.contains("sync_fs"), "one Sync for the run: {sent}");
    assert!(!sent.contains("fsync"), "no fsync per file: {sent}");
    let on_server = server.home_path("alice").join("many");
    assert_eq!(tree_listing(&on_server), tree_listing(&tree));
    assert!(partial_files(&on_server.join("d0")).is_empty() && partial_files(&on_server).is_empty());

    let back = work.path().join("back");
    let run = netcp
        .run_logged([
            std::ffi::OsStr::new("-r"),
            "-j".as_ref(),
            "4".as_ref(),
            netcp.remote("many").as_os_str(),
            back.as_os_str(),
        ])
        .ok();
    let sent = requests_sent(&run.stderr);
    assert!(sent.contains("(\"get_files\", 1)"), "30 small files in one GetFiles: {sent}");
    assert!(sent.contains("(\"get_file\", 1)"), "the 1 MiB file in one GetFile: {sent}");
    assert!(!sent.contains("fsync"), "no fsync per file: {sent}");
    assert_eq!(tree_listing(&back), tree_listing(&tree));
}

fn mode_and_mtime(p: &Path) -> (u32, std::time::SystemTime) {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.permissions().mode() & 0o7777, m.modified().expect("mtime"))
}

#[test]
fn netcp_preserve_keeps_mode_and_mtime() {
    use std::os::unix::fs::PermissionsExt;
    let (server, netcp) = server_with_alice("netcp_preserve_keeps_mode_and_mtime", None);
    let work = tempfile::tempdir().expect("tempdir");
    let f = work.path().join("script.sh");
    write_random(&f, 1000, 9);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let old = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789);
    std::fs::File::options().write(true).open(&f).expect("open").set_modified(old).expect("set mtime");

    netcp.run([std::ffi::OsStr::new("-p"), f.as_os_str(), netcp.remote("").as_os_str()]).ok();
    assert_eq!(mode_and_mtime(&server.home_path("alice").join("script.sh")), (0o750, old));
    let back = work.path().join("back.sh");
    netcp.run([std::ffi::OsStr::new("-p"), netcp.remote("script.sh").as_os_str(), back.as_os_str()]).ok();
    assert_eq!(mode_and_mtime(&back), (0o750, old));
}

#[test]
fn netcp_put_over_quota_is_refused_before_sending() {
    let (server, netcp) = server_with_alice("netcp_put_over_quota_is_refused_before_sending", Some("1M"));
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big.iso");
    write_random(&big, 2 << 20, 7);
    let home = server.home_path("alice");
    let before: Vec<_> = std::fs::read_dir(&home).expect("home").flatten().map(|e| e.file_name()).collect();
    let run = netcp.run([big.as_os_str(), netcp.remote("big.iso").as_os_str()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let line = run.stderr.lines().find(|l| l.starts_with("netcp: put ")).unwrap_or_default();
    assert!(
        line.contains("big.iso: Disk quota exceeded (needs 2.0 MiB, ") && line.ends_with("free)"),
        "stderr: {}",
        run.stderr
    );
    let after: Vec<_> = std::fs::read_dir(&home).expect("home").flatten().map(|e| e.file_name()).collect();
    assert_eq!(before, after, "the refused put changed the home");
}

#[test]
fn netcp_get_of_symlink_out_of_home_never_reads_outside() {
    let (server, netcp) = server_with_alice("netcp_get_of_symlink_out_of_home_never_reads_outside", None);
    let work = tempfile::tempdir().expect("tempdir");
    let secret = work.path().join("secret");
    std::fs::write(&secret, b"TOP SECRET outside the home").expect("write");
    // An atime older than the mtime: under relatime (and strictatime) any read of the file moves it.
    let old_atime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let times = std::fs::FileTimes::new().set_accessed(old_atime).set_modified(std::time::SystemTime::now());
    std::fs::File::options().write(true).open(&secret).expect("open").set_times(times).expect("set times");
    let home = server.home_path("alice");
    std::os::unix::fs::symlink(&secret, home.join("escape")).expect("symlink");
    let dots = "../".repeat(home.components().count() + 2);
    std::os::unix::fs::symlink(format!("{dots}{}", secret.display()), home.join("escape-rel")).expect("symlink");

    for name in ["escape", "escape-rel"] {
        let out = work.path().join(format!("got-{name}"));
        let run = netcp.run([netcp.remote(name).as_os_str(), out.as_os_str()]);
        eprintln!("get {name}: exit {:?}, {}", run.code, run.stderr.trim());
        if run.code == Some(0) {
            let got = std::fs::read(&out).expect("read");
            assert_ne!(got, b"TOP SECRET outside the home", "netcp read the file outside the home through {name}");
        } else {
            assert!(run.stderr.starts_with(&format!("netcp: get {name}: ")), "{run:?}");
            assert!(!out.exists(), "a failed get left {}", out.display());
        }
    }
    let atime = std::fs::metadata(&secret).expect("stat").accessed().expect("atime");
    assert_eq!(atime, old_atime, "the file outside the home was read");
    // With -r the link itself is copied, never followed.
    let out = work.path().join("linkcopy");
    netcp.run([std::ffi::OsStr::new("-r"), netcp.remote("escape").as_os_str(), out.as_os_str()]).ok();
    assert_eq!(std::fs::read_link(&out).expect("a symlink"), secret);
}

#[test]
fn netcp_bars_on_a_terminal_lines_in_a_pipe() {
    let (_server, netcp) = server_with_alice("netcp_bars_on_a_terminal_lines_in_a_pipe", None);
    let work = tempfile::tempdir().expect("tempdir");
    let f = work.path().join("f.bin");
    write_random(&f, 8 << 20, 8);

    let remote = netcp.remote("f.bin");
    let pty = netcp.on_pty(&["f.bin", remote.to_str().expect("utf-8")], "", work.path());
    assert_eq!(pty.code, Some(0), "{pty:?}");
    assert!(pty.stdout.contains("ETA") && pty.stdout.contains("verified"), "no bar on the terminal: {:?}", pty.stdout);

    // Several files: an overall bar too.
    std::fs::copy(&f, work.path().join("f2.bin")).expect("copy");
    let home = netcp.remote("");
    let pty = netcp.on_pty(&["-j", "2", "f.bin", "f2.bin", home.to_str().expect("utf-8")], "", work.path());
    assert_eq!(pty.code, Some(0), "{pty:?}");
    assert!(pty.stdout.contains("total 2/2 files"), "no overall bar: {:?}", pty.stdout);

    let piped = netcp.run([f.as_os_str(), netcp.remote("g.bin").as_os_str()]).ok();
    assert!(!piped.stdout.contains("ETA") && !piped.stdout.contains('\x1b'), "bar in a pipe: {:?}", piped.stdout);
    let lines: Vec<&str> = piped.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("8388608 bytes in ") && lines[0].ends_with(", verified"), "{lines:?}");

    let quiet = netcp.run([std::ffi::OsStr::new("-q"), f.as_os_str(), netcp.remote("h.bin").as_os_str()]).ok();
    assert_eq!(quiet.stdout, "");
}

#[test]
fn netcp_put_checks_each_segment_while_streaming() {
    let (server, netcp) = server_with_alice("netcp_put_checks_each_segment_while_streaming", None);
    let work = tempfile::tempdir().expect("tempdir");
    let big = work.path().join("big");
    // Segments of 32 MiB: two whole ones and a short last one, each checked by its own Checksum
    // (no whole-file pass after the last write).
    write_random(&big, (80 << 20) + 5, 11);
    let run = netcp.run_logged(["--no-resume".as_ref(), big.as_os_str(), netcp.remote("big").as_os_str()]).ok();
    let sent = requests_sent(&run.stderr);
    assert!(sent.contains("(\"checksum\", 3)"), "one checksum per 32 MiB segment: {sent}");
    assert!(sent.contains("(\"write\", 321)"), "80 MiB + 5 B in 256 KiB writes: {sent}");
    assert_eq!(hash_file(&server.home_path("alice").join("big")), hash_file(&big));
    assert!(partial_files(&server.home_path("alice")).is_empty());
}

#[test]
fn netcp_put_of_a_fifo_fails_without_opening_it_for_long() {
    let (server, netcp) = server_with_alice("netcp_put_of_a_fifo_fails_without_opening_it_for_long", None);
    let work = tempfile::tempdir().expect("tempdir");
    let fifo = work.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let file = work.path().join("file");
    write_random(&file, 5000, 12);
    // No writer ever opens the FIFO: a blocking open would hang here (the run is bounded).
    let run = netcp.run([fifo.as_os_str(), file.as_os_str(), netcp.remote("").as_os_str()]);
    assert_eq!(run.code, Some(1), "one file failed: {}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("fifo: not a regular file"), "{}", run.stderr);
    let home = server.home_path("alice");
    assert_eq!(hash_file(&home.join("file")), hash_file(&file));
    assert!(!home.join("fifo").exists());
}

/// The count of `kind` in the "requests sent" line (0 when not sent).
fn count_of(sent: &str, kind: &str) -> u64 {
    let key = format!("(\"{kind}\", ");
    sent.split(&key).nth(1).and_then(|rest| rest.split(')').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// `files` small files of varied sizes (0 to ~6 KiB) spread over `dirs` directories under `root`.
fn small_tree(root: &Path, dirs: u64, files: u64) {
    for i in 0..files {
        let dir = root.join(format!("d{}", i % dirs));
        std::fs::create_dir_all(&dir).expect("mkdir");
        write_random(&dir.join(format!("f{i}")), (i * 997) % 6000, i);
    }
}

#[test]
fn netcp_tree_of_small_files_goes_in_batches_both_ways() {
    let (server, netcp) = server_with_alice("netcp_tree_of_small_files_goes_in_batches_both_ways", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("small");
    small_tree(&tree, 5, 300);
    let args = |from: &std::ffi::OsStr, to: &std::ffi::OsStr| {
        vec![std::ffi::OsString::from("-r"), "-j".into(), "4".into(), from.to_owned(), to.to_owned()]
    };
    let run = netcp.run_logged(args(tree.as_os_str(), netcp.remote("").as_os_str())).ok();
    let sent = requests_sent(&run.stderr);
    // 300 files of at most 6 KiB: 64 a batch.
    assert_eq!(count_of(&sent, "put_files"), 5, "300 files in 5 batches: {sent}");
    assert_eq!(count_of(&sent, "put_file"), 0, "no file on its own: {sent}");
    assert_eq!(count_of(&sent, "sync"), 1, "one Sync for the run: {sent}");
    assert_eq!(run.stdout.lines().filter(|l| l.ends_with("verified")).count(), 300, "one line per file");
    let on_server = server.home_path("alice").join("small");
    assert_eq!(tree_listing(&on_server), tree_listing(&tree));
    assert!(partial_files(&on_server.join("d0")).is_empty());

    let back = work.path().join("back");
    let run = netcp.run_logged(args(netcp.remote("small").as_os_str(), back.as_os_str())).ok();
    let sent = requests_sent(&run.stderr);
    assert_eq!(count_of(&sent, "get_files"), 5, "300 files in 5 batches: {sent}");
    assert_eq!(count_of(&sent, "get_file"), 0, "no file on its own: {sent}");
    assert_eq!(count_of(&sent, "open"), 0, "no file streamed: {sent}");
    assert_eq!(tree_listing(&back), tree_listing(&tree));
    assert!(partial_files(&back.join("d0")).is_empty());
}

#[test]
fn netcp_tree_get_flushes_in_the_background_as_files_land() {
    let (_server, netcp) = server_with_alice("netcp_tree_get_flushes_in_the_background_as_files_land", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("many");
    // 600 files: a background syncfs is due after each 256 landed (a third of them, at least 256).
    small_tree(&tree, 6, 600);
    let up = vec![std::ffi::OsString::from("-r"), tree.clone().into_os_string(), netcp.remote("")];
    netcp.run(up).ok();
    let back = work.path().join("back");
    let mut c = netcp.command();
    c.env("NETCP_LOG", "netcp=debug,homefs_mount::copy=debug").args([
        std::ffi::OsString::from("-r"),
        "-j".into(),
        "4".into(),
        netcp.remote("many"),
        back.clone().into_os_string(),
    ]);
    let run = run_bounded(c, std::time::Duration::from_secs(300)).ok();
    // Started, or skipped because much else was dirty on this machine at that moment: either way
    // at the point the tree's files crossed the threshold, and at most once per 256 files.
    let log = without_colours(&run.stderr);
    let flushes: Vec<&str> = log.lines().filter(|l| l.contains("get: background syncfs")).collect();
    assert!(!flushes.is_empty() && flushes.len() <= 2, "one or two background flushes: {log}");
    for line in &flushes {
        let stored: u64 = line
            .split("stored=")
            .nth(1)
            .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!((256..600).contains(&stored), "flushed after {stored} of 600 files: {line}");
    }
    assert!(log.contains("local file systems synced"), "the final sync ran: {log}");
    assert_eq!(tree_listing(&back), tree_listing(&tree));
}

/// `text` without its ANSI colour sequences (ESC [ ... letter), as the log may colour its fields.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[test]
fn netcp_batch_with_a_refused_file_fails_only_that_file() {
    let (server, netcp) = server_with_alice("netcp_batch_with_a_refused_file_fails_only_that_file", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("small");
    small_tree(&tree, 2, 40);
    // On the server, a non-empty directory where d1/f7 goes: the rename onto it fails.
    let on_server = server.home_path("alice").join("small");
    std::fs::create_dir_all(on_server.join("d1/f7/inside")).expect("mkdir");
    let run = netcp.run_logged([std::ffi::OsStr::new("-r"), tree.as_os_str(), netcp.remote("").as_os_str()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let sent = requests_sent(&run.stderr);
    assert_eq!(count_of(&sent, "put_files"), 1, "40 files in one batch: {sent}");
    let failures: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("netcp: ")).collect();
    assert_eq!(failures.len(), 1, "only the one file failed: {failures:?}");
    let f7 = tree.join("d1/f7");
    assert!(failures[0].starts_with(&format!("netcp: put {}: ", f7.display())), "names the file: {failures:?}");
    assert!(failures[0].to_lowercase().contains("directory"), "says why: {failures:?}");
    assert!(on_server.join("d1/f7/inside").is_dir(), "the directory is untouched");
    for i in (0..40).filter(|&i| i != 7) {
        let rel = format!("d{}/f{i}", i % 2);
        assert_eq!(hash_file(&on_server.join(&rel)), hash_file(&tree.join(&rel)), "{rel}");
    }
    assert!(partial_files(&on_server.join("d1")).is_empty(), "no temporary file left");
}

#[test]
fn netcp_batch_over_quota_refuses_the_files_that_do_not_fit() {
    let (server, netcp) = server_with_alice("netcp_batch_over_quota_refuses_the_files_that_do_not_fit", Some("64K"));
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("q");
    std::fs::create_dir_all(&tree).expect("mkdir");
    for i in 0..30 {
        write_random(&tree.join(format!("f{i:02}")), 4096, i);
    }
    let run = netcp.run_logged([std::ffi::OsStr::new("-r"), tree.as_os_str(), netcp.remote("").as_os_str()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(count_of(&requests_sent(&run.stderr), "put_files"), 1, "{}", run.stderr);
    let refused: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("netcp: put ")).collect();
    assert!(!refused.is_empty() && refused.len() < 30, "some fit, some do not: {refused:?}");
    for line in &refused {
        assert!(line.contains(": Disk quota exceeded (needs 4.0 KiB, ") && line.ends_with("free)"), "{line}");
    }
    let on_server = server.home_path("alice").join("q");
    let landed: Vec<_> = std::fs::read_dir(&on_server).expect("list").flatten().map(|e| e.file_name()).collect();
    assert_eq!(landed.len() + refused.len(), 30, "each file landed or was refused: {landed:?}");
    for name in &landed {
        assert_eq!(hash_file(&on_server.join(name)), hash_file(&tree.join(name)), "{name:?}");
    }
}

#[test]
fn netcp_batches_keep_mode_and_mtime_with_preserve() {
    use std::os::unix::fs::PermissionsExt;
    let (server, netcp) = server_with_alice("netcp_batches_keep_mode_and_mtime_with_preserve", None);
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("p");
    small_tree(&tree, 2, 20);
    let modes = [0o600, 0o640, 0o750, 0o444];
    for i in 0..20u32 {
        let f = tree.join(format!("d{}/f{i}", i % 2));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(modes[i as usize % 4])).expect("chmod");
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000 + u64::from(i) * 1000, i * 1000 + 7);
        std::fs::File::options().write(true).open(&f).expect("open").set_modified(t).expect("set mtime");
    }
    let run =
        netcp.run_logged([std::ffi::OsStr::new("-r"), "-p".as_ref(), tree.as_os_str(), netcp.remote("").as_os_str()]);
    let run = run.ok();
    assert_eq!(count_of(&requests_sent(&run.stderr), "put_files"), 1, "{}", run.stderr);
    let back = work.path().join("back");
    let run =
        netcp.run_logged([std::ffi::OsStr::new("-r"), "-p".as_ref(), netcp.remote("p").as_os_str(), back.as_os_str()]);
    let run = run.ok();
    assert_eq!(count_of(&requests_sent(&run.stderr), "get_files"), 1, "{}", run.stderr);
    let on_server = server.home_path("alice").join("p");
    for i in 0..20 {
        let rel = format!("d{}/f{i}", i % 2);
        let want = mode_and_mtime(&tree.join(&rel));
        assert_eq!(mode_and_mtime(&on_server.join(&rel)), want, "on the server: {rel}");
        assert_eq!(mode_and_mtime(&back.join(&rel)), want, "back here: {rel}");
    }
    assert_eq!(tree_listing(&back), tree_listing(&tree));
}
