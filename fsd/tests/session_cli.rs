//! The `fsd` binary: `init`, `user add|list|quota|passwd|del`, `serve` (its two stdout lines and
//! a clean SIGTERM), and, as root, the switch to `run_as`.

#[path = "session_support/mod.rs"]
mod support;

use bytes::BufMut;
use homefs_shared::frame::encode_prefix;
use homefs_shared::{
    ErrorCode, OpenFlags, Request, RequestHeader, RequestId, Response, SetAttr, WirePath, MAX_DATA_BYTES,
    MAX_FRAME_BYTES,
};
use std::path::Path;
use support::{fsd, granted, tcp_queues, wait_until, Instance, ServeProcess};

fn list_row(config: &Path, user: &str) -> Option<Vec<String>> {
    let (ok, out, err) = fsd(&["user", "list"], config, "");
    assert!(ok, "fsd user list failed: {err}");
    assert!(out.starts_with("USER"), "no header: {out}");
    out.lines().map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>()).find(|cols| cols[0] == user)
}

#[test]
fn init_refuses_to_overwrite_an_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("inst");
    let d = dir.to_str().unwrap();
    let (ok, out, err) = fsd(&["init", d, "--listen", "127.0.0.1:7999", "--run-as", ""], Path::new("none"), "");
    assert!(ok, "fsd init failed: {err}");
    assert!(out.contains("fingerprint SHA256:"), "{out}");
    for f in ["fsd.toml", "users.toml", "token.key", "cert.pem", "key.pem", "homes"] {
        assert!(dir.join(f).exists(), "fsd init made no {f}");
    }
    use std::os::unix::fs::PermissionsExt;
    for f in ["token.key", "key.pem", "users.toml"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
    assert_eq!(std::fs::read(dir.join("token.key")).unwrap().len(), 32);
    let config = fsd::config::Config::load(&dir.join("fsd.toml")).unwrap();
    assert_eq!(config.listen.addr, "127.0.0.1:7999");
    assert_eq!(config.run_as, "");

    let before = std::fs::read(dir.join("token.key")).unwrap();
    let (ok, _, err) = fsd(&["init", d], Path::new("none"), "");
    assert!(!ok, "a second init succeeded");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(dir.join("token.key")).unwrap(), before, "the key was overwritten");
}

#[test]
fn user_commands_edit_the_users_file() {
    let inst = Instance::new("cli-users");
    let cfg = inst.config_file.as_path();
    let (ok, _, err) = fsd(&["user", "add", "alice", "--quota", "1G", "--password-stdin"], cfg, "s3cret\n");
    assert!(ok, "user add: {err}");
    let (ok, _, err) = fsd(&["user", "add", "alice", "--password-stdin"], cfg, "x\n");
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = fsd(&["user", "add", "bob", "--password-stdin"], cfg, "\n");
    assert!(!ok && err.contains("empty password"), "{err}");
    let (ok, _, err) = fsd(&["user", "add", "Bad/Name", "--password-stdin"], cfg, "x\n");
    assert!(!ok && err.contains("not a valid user name"), "{err}");
    let (ok, _, err) = fsd(&["user", "add", "bob", "--quota", "lots", "--password-stdin"], cfg, "x\n");
    assert!(!ok && err.contains("invalid size"), "{err}");

    let row = list_row(cfg, "alice").expect("alice is listed");
    assert_eq!(row[1..5], ["0", "1.0G", "0.0%", "0"], "{row:?}");
    assert_eq!(row[5], (1u64 << 30).to_string());
    assert!(list_row(cfg, "bob").is_none());

    let (ok, _, err) = fsd(&["user", "quota", "alice", "2.5G"], cfg, "");
    assert!(ok, "user quota: {err}");
    assert_eq!(list_row(cfg, "alice").unwrap()[2], "2.5G");

    let users = fsd::accounts::users::UsersFile::load(&inst.dir.join("users.toml")).unwrap();
    let old_hash = users.users["alice"].password.clone();
    assert!(old_hash.starts_with("$argon2id$"), "{old_hash}");
    let (ok, _, err) = fsd(&["user", "passwd", "alice", "--password-stdin"], cfg, "n3w\n");
    assert!(ok, "user passwd: {err}");
    let users = fsd::accounts::users::UsersFile::load(&inst.dir.join("users.toml")).unwrap();
    assert_ne!(users.users["alice"].password, old_hash);

    // add made the home, private, before any login; del keeps it unless --purge.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(inst.dir.join("homes/alice")).expect("user add made the home").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    std::fs::write(inst.dir.join("homes/alice/f"), b"12345").unwrap();
    let (ok, _, err) = fsd(&["user", "del", "alice"], cfg, "");
    assert!(ok, "user del: {err}");
    assert!(list_row(cfg, "alice").is_none());
    assert!(inst.dir.join("homes/alice/f").exists(), "del without --purge removed the home");
    let (ok, _, err) = fsd(&["user", "del", "alice"], cfg, "");
    assert!(!ok && err.contains("no user"), "{err}");

    let (ok, _, _) = fsd(&["user", "add", "carol", "--password-stdin"], cfg, "pw\n");
    assert!(ok);
    assert!(inst.dir.join("homes/carol").is_dir());
    let (ok, _, err) = fsd(&["user", "del", "carol", "--purge"], cfg, "");
    assert!(ok, "user del --purge: {err}");
    assert!(!inst.dir.join("homes/carol").exists(), "--purge kept the home");
}

#[test]
fn user_list_shows_usage() {
    let inst = Instance::new("cli-usage");
    let cfg = inst.config_file.as_path();
    let (ok, _, err) = fsd(&["user", "add", "dora", "--quota", "1M", "--password-stdin"], cfg, "pw\n");
    assert!(ok, "{err}");
    std::fs::create_dir_all(inst.dir.join("homes/dora/sub")).unwrap();
    std::fs::write(inst.dir.join("homes/dora/a"), vec![0u8; 1000]).unwrap();
    std::fs::write(inst.dir.join("homes/dora/sub/b"), vec![0u8; 48]).unwrap();
    let row = list_row(cfg, "dora").unwrap();
    // scan_usage counts apparent sizes (directories included as the ops work defines them).
    let used: u64 = row[4].parse().unwrap();
    assert!(used >= 1048, "usage {used} misses file bytes: {row:?}");
    assert_eq!(row[5], (1u64 << 20).to_string());
}

#[tokio::test]
async fn serve_prints_its_address_and_fingerprint_and_stops_on_sigterm() {
    let inst = Instance::new("cli-serve");
    let log = inst.tmp.path().join("fsd.log");
    let mut server = ServeProcess::start(&inst.config_file, &log);
    assert_ne!(server.addr.port(), 0, "the real port is printed, not 0");
    assert!(server.fingerprint.starts_with("SHA256:"));
    // The fingerprint printed is the one presented (the client pins it).
    server.connect().await.hello().await;
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "fsd serve exited with {status} after SIGTERM");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("listening"), "the log file has no start line: {log}");
}

/// SIGTERM while a 4 MiB write is half received: fsd stops accepting, reads the rest of that
/// write, writes it, answers it, closes the connection and exits 0; the file holds every byte.
#[tokio::test]
async fn sigterm_finishes_a_write_in_flight_then_exits() {
    let inst = Instance::new("cli-sigterm-write");
    inst.add_user("sam", "pw");
    let log = inst.tmp.path().join("fsd.log");
    let mut server = ServeProcess::start(&inst.config_file, &log);
    let mut c = server.connect().await;
    granted(&c.login("sam", "pw").await);
    let path = WirePath::new(b"big".to_vec()).unwrap();
    let flags = OpenFlags { write: true, create: true, ..OpenFlags::default() };
    let Ok(Response::Opened { fh, .. }) = c.call(Request::Open { path, flags, mode: 0o600 }).await else {
        panic!("open failed")
    };
    let data: Vec<u8> = (0..MAX_DATA_BYTES).map(|i| (i % 251) as u8).collect();
    let id = RequestId(1000);
    let header = RequestHeader { id, request: Request::Write { fh, offset: 0 } };
    let mut frame = encode_prefix(&header, data.len(), MAX_FRAME_BYTES).unwrap();
    frame.put_slice(&data);
    let half = frame.len() / 2;
    c.send_raw(&frame[..half]).await;
    // The first half has left this socket and fsd has read it out of its own: the write is in
    // flight on the server.
    let (server_addr, client_addr) = (server.addr, c.local_addr());
    wait_until("fsd to read the first half of the write", || async move {
        tcp_queues(client_addr, Some(server_addr)).is_some_and(|q| q.tx == 0)
            && tcp_queues(server_addr, Some(client_addr)).is_some_and(|q| q.rx == 0)
    })
    .await;
    server.send_sigterm();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("fsd to log that it stopped accepting", || {
        let stopped = log_text().contains("stopped accepting");
        async move { stopped }
    })
    .await;
    c.send_raw(&frame[half..]).await;
    let (answer, _) = c.recv().await;
    assert_eq!(answer.id, id);
    assert_eq!(answer.result, Ok(Response::Written { len: MAX_DATA_BYTES, size: MAX_DATA_BYTES as u64 }));
    c.expect_closed("after the last in-flight write during shutdown").await;
    let status = tokio::task::spawn_blocking(move || server.wait_exit()).await.unwrap();
    assert!(status.success(), "fsd serve exited with {status} after SIGTERM");
    let stored = std::fs::read(inst.dir.join("homes/sam/big")).expect("the written file");
    assert_eq!(blake3::hash(&stored), blake3::hash(&data), "the file holds every byte written ({})", stored.len());
}

/// Even at the debug level the log has a line per login (user, peer, 201 or 401) but never the
/// password or the token.
#[tokio::test]
async fn logins_are_logged_without_passwords_or_tokens() {
    const PASSWORD: &str = "correct-horse-battery";
    const WRONG: &str = "wrong-staple-guess";
    let inst = Instance::new("cli-log-secrets");
    inst.add_user("lena", PASSWORD);
    let log = inst.tmp.path().join("fsd.log");
    let mut server = ServeProcess::start_with_env(&inst.config_file, &log, &[("RUST_LOG", "debug")]);
    let mut c = server.connect().await;
    c.hello().await;
    let denied = c.call(Request::Login { user: "lena".into(), password: WRONG.into() }).await.unwrap();
    assert!(support::is_denied(&denied), "{denied:?}");
    let token = granted(&c.call(Request::Login { user: "lena".into(), password: PASSWORD.into() }).await.unwrap());
    c.call(Request::Ping).await.unwrap();
    let mut again = server.connect().await;
    granted(&again.resume(&token).await);
    drop((c, again));
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let logins: Vec<&str> = text.lines().filter(|l| l.contains(" login") && l.contains("user=")).collect();
    assert!(logins.iter().any(|l| l.contains("code=401") && l.contains("lena") && l.contains("peer=")), "{text}");
    assert_eq!(logins.iter().filter(|l| l.contains("code=201")).count(), 2, "{text}");
    for secret in [PASSWORD, WRONG, token.0.as_str()] {
        assert!(!text.contains(secret), "the log holds a secret {secret:?}:\n{text}");
    }
}

/// Root only: `fsd init` as root picks `nobody`; the served process runs as it, and file modes
/// are enforced (a mode 000 file cannot be read back).
#[tokio::test]
async fn served_as_root_the_process_runs_as_run_as() {
    if !fsd::privs::is_root() {
        assert!(std::env::var_os("HOMEFS_REQUIRE_FUSE").is_none(), "this test needs root (HOMEFS_REQUIRE_FUSE is set)");
        eprintln!("skipped: needs root");
        return;
    }
    let inst = Instance::with_run_as("cli-privs", None);
    let config = inst.config();
    assert_eq!(config.run_as, "nobody", "fsd init as root picks nobody");
    let nobody = fsd::privs::lookup("nobody").unwrap();
    let cfg = inst.config_file.as_path();
    let (ok, _, err) = fsd(&["user", "add", "ruth", "--password-stdin"], cfg, "pw\n");
    assert!(ok, "{err}");
    use std::os::unix::fs::MetadataExt;
    let home = std::fs::metadata(inst.dir.join("homes/ruth")).expect("user add made the home");
    assert_eq!((home.uid(), home.gid()), (nobody.uid.as_raw(), nobody.gid.as_raw()), "the home is run_as's");
    // The instance dir must be searchable by nobody for users file reloads (a tempdir is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(inst.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let log = inst.tmp.path().join("fsd.log");
    let server = ServeProcess::start(cfg, &log);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in status"));
        line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect()
    };
    assert_eq!(ids("Uid:"), vec![nobody.uid.as_raw(); 4], "{status}");
    assert_eq!(ids("Gid:"), vec![nobody.gid.as_raw(); 4], "{status}");

    let mut c = server.connect().await;
    granted(&c.login("ruth", "pw").await);
    let path = WirePath::new(b"secret".to_vec()).unwrap();
    let create = OpenFlags { write: true, create: true, ..OpenFlags::default() };
    let opened = c.call(Request::Open { path: path.clone(), flags: create, mode: 0o600 }).await.unwrap();
    let Response::Opened { fh, .. } = opened else { panic!("{opened:?}") };
    c.call(Request::Close { fh }).await.unwrap();
    let set = SetAttr { mode: Some(0), ..SetAttr::default() };
    c.call(Request::SetAttr { path: path.clone(), fh: None, set }).await.unwrap();
    let read = OpenFlags { read: true, ..OpenFlags::default() };
    let err =
        c.call(Request::Open { path: path.clone(), flags: read, mode: 0 }).await.expect_err("mode 000 is enforced");
    assert_eq!(err.code, ErrorCode::Access);
    // chmod by path never opens the file for reading (it may not be readable, as here): under
    // run_as and Landlock, glibc's no-follow fchmodat (an O_PATH fd and /proc/self/fd) works.
    let set = SetAttr { mode: Some(0o600), ..SetAttr::default() };
    c.call(Request::SetAttr { path: path.clone(), fh: None, set }).await.expect("chmod a mode 000 file back");
    let opened = c.call(Request::Open { path, flags: read, mode: 0 }).await.expect("readable again");
    assert!(matches!(opened, Response::Opened { .. }), "{opened:?}");
    // Confined to reading the users file's directory, the server still picks up a new user.
    let (ok, _, err) = fsd(&["user", "add", "sven", "--password-stdin"], cfg, "pw2\n");
    assert!(ok, "{err}");
    let server = &server;
    support::wait_until("the running server to pick up a new user", || async move {
        let mut c = server.connect().await;
        matches!(c.login("sven", "pw2").await, Response::Login { code: 201, .. })
    })
    .await;
}
