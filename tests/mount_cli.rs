//! The netmount command itself: failures give one line and a non-zero status with nothing
//! mounted; `-u`, SIGTERM and a killed daemon all leave no mount behind; `-o ro`.

use homefs_tests::mount::{
    daemon_pid, fuse_available, is_mounted, netmount_command, output_within, poll_until, wait_until, TestMount,
    MOUNT_TIMEOUT, PASSWORD,
};
use homefs_tests::{binary, TestServer};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line of reason, got: {err:?}");
    err
}

#[test]
fn mount_fails_cleanly_on_bad_password_mountpoint_or_option() {
    if !fuse_available("mount_fails_cleanly_on_bad_password_mountpoint_or_option") {
        return;
    }
    let server = TestServer::start("mount_fails_cleanly");
    server.add_user("alice", PASSWORD, None);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let run = |mountpoint: &Path, pw: &str, extra: &[&str]| {
        output_within(netmount_command(&server, "alice", pw, mountpoint, extra), MOUNT_TIMEOUT, "netmount")
    };

    let out = run(&mnt, "wrong password", &[]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("401"), "{out:?}");
    assert!(!is_mounted(&mnt), "nothing mounted after a refused login");

    let out = run(&dir.path().join("missing"), PASSWORD, &[]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("does not exist"));

    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let out = run(&dir.path().join("file"), PASSWORD, &[]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("not a directory"));

    let out = run(&mnt, PASSWORD, &["-o", "ro,frobnicate"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("frobnicate"));

    // Busy: mounted once, a second mount on it is refused.
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let out = run(&m.path, PASSWORD, &[]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("busy"));
}

#[test]
fn mount_unmount_by_flag_signal_and_crash() {
    if !fuse_available("mount_unmount_by_flag_signal_and_crash") {
        return;
    }
    let server = TestServer::start("mount_unmount_paths");
    server.add_user("alice", PASSWORD, None);

    // netmount -u
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let mut cmd = Command::new(binary("netmount"));
    cmd.arg("-u").arg(&m.path);
    let out = output_within(cmd, Duration::from_secs(30), "netmount -u");
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mounted(&m.path));

    // SIGTERM to the daemon unmounts cleanly.
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let pid = daemon_pid(&m.path);
    // The background daemon runs with one malloc arena (its memory bound), unless we chose otherwise.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() && std::env::var_os("GLIBC_TUNABLES").is_none() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read the daemon's environment");
        assert!(
            environ.split(|b| *b == 0).any(|v| v == b"MALLOC_ARENA_MAX=1"),
            "MALLOC_ARENA_MAX=1 in the daemon's environment"
        );
    }
    assert!(Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap().success());
    wait_until(Duration::from_secs(15), "SIGTERM to unmount", || !is_mounted(&m.path));

    // A daemon that dies (SIGKILL) leaves no dead mountpoint behind.
    let m = TestMount::new(&server, "alice", PASSWORD, "");
    let pid = daemon_pid(&m.path);
    assert!(Command::new("kill").arg("-KILL").arg(pid.to_string()).status().unwrap().success());
    // fusermount3 (auto_unmount) unmounts once the daemon's end of its socket closes. Under a
    // loaded full suite this once took longer than 15 s; the failure says who was still there.
    let gone = poll_until(Duration::from_secs(60), || !is_mounted(&m.path));
    assert!(gone, "the killed daemon's mount still there after 60 s: {}", who_holds(&m.path, pid));
    assert!(std::fs::read_dir(&m.path).is_ok(), "the mountpoint is an ordinary directory again");
}

#[test]
fn mount_read_only_option() {
    if !fuse_available("mount_read_only_option") {
        return;
    }
    let server = TestServer::start("mount_read_only_option");
    server.add_user("alice", PASSWORD, None);
    let rw = TestMount::new(&server, "alice", PASSWORD, "");
    rw.sh_ok("echo data > f");
    rw.unmount();
    let m = TestMount::new(&server, "alice", PASSWORD, "ro,cache_ttl=0");
    assert_eq!(m.sh_ok("cat f"), "data\n");
    let out = m.sh("echo x > g");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    assert!(!server.home_path("alice").join("g").exists());
}

#[test]
fn mount_helper_maps_fstab_options() {
    if !fuse_available("mount_helper_maps_fstab_options") {
        return;
    }
    let server = TestServer::start("mount_helper_maps_fstab_options");
    server.add_user("alice", PASSWORD, None);
    let dir = tempfile::tempdir().unwrap();
    let (mnt, pw) = (dir.path().join("mnt"), dir.path().join("pw"));
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mount.homefs");
    let bin_dir = binary("netmount").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    // As mount(8) calls it for an fstab line: SPEC DIR -o OPTIONS (with its own -n).
    let opts = format!("_netdev,nofail,password_file={},fingerprint={},cache_ttl=2", pw.display(), server.fingerprint);
    let mut cmd = Command::new(&helper);
    cmd.arg(format!("alice@{}", server.addr)).arg(&mnt).args(["-n", "-o", &opts]).env("PATH", &path);
    cmd.env_remove("HOMEFS_PASSWORD");
    let out = output_within(cmd, MOUNT_TIMEOUT, "mount.homefs");
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&mnt));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(" fuse.homefs ") && l.contains(mnt.to_str().unwrap())),
        "type fuse.homefs"
    );
    let mut cmd = Command::new(binary("netmount"));
    cmd.arg("-u").arg(&mnt);
    assert!(output_within(cmd, Duration::from_secs(30), "netmount -u").status.success());
    assert!(!is_mounted(&mnt));
}

/// The processes whose command line names `mountpoint` (fusermount3, the daemon) and the state of
/// `pid`: what a test that waited for a mount to go reports.
fn who_holds(mountpoint: &std::path::Path, pid: u32) -> String {
    let needle = mountpoint.as_os_str().as_encoded_bytes();
    let mut out = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => format!("daemon {pid}: {}; ", status.lines().find(|l| l.starts_with("State")).unwrap_or("?")),
        Err(_) => format!("daemon {pid}: gone; "),
    };
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let wchan = std::fs::read_to_string(entry.path().join("wchan")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            out.push_str(&format!("{} [{wchan}] {cmd}; ", entry.file_name().to_string_lossy()));
        }
    }
    out
}
